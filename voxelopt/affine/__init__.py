"""Affine pre-alignment: world matrices, their displacements, ITK transform files.

See :mod:`voxelopt.affine.geometry` for the conventions (a world matrix maps fixed-space RAS+
points to moving-space points, the pull direction of the Learn2Reg displacement).
"""

from voxelopt.affine.align import MODES, AffineResult, align_affine
from voxelopt.affine.geometry import (
    affine_displacement,
    check_matrix,
    compose_affine_and_field,
    resample_moving,
    voxel_matrix,
)
from voxelopt.affine.itk import (
    read_itk_transform,
    read_world_matrix,
    write_itk_transform,
    write_world_matrix,
)
from voxelopt.affine.module import AffineAlign

__all__ = [
    "MODES",
    "AffineAlign",
    "AffineResult",
    "affine_displacement",
    "align_affine",
    "check_matrix",
    "compose_affine_and_field",
    "read_itk_transform",
    "read_world_matrix",
    "resample_moving",
    "voxel_matrix",
    "write_itk_transform",
    "write_world_matrix",
]
