"""VoxelOpt: voxel-adaptive message passing for discrete optimisation in deformable registration.

See ``docs/ARCHITECTURE.md`` for the data's way through the modules and the conventions
(tensors ``(B, C, D, H, W)``, displacements ``(B, 3, D, H, W)`` in voxels).
"""

from voxelopt.config import VoxelOptConfig

__all__ = ["VoxelOptConfig"]
__version__ = "0.1.0"
