"""``AffineAlign``: the affine stage as an ``nn.Module`` for training/inference pipelines."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from voxelopt.affine.align import MODES, AffineResult, align_affine
from voxelopt.affine.geometry import affine_displacement
from voxelopt.checks import check_image_pair, check_spacing

__all__ = ["AffineAlign"]

_CANONICAL = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


class AffineAlign(nn.Module):
    """Rigid/affine pre-alignment of image pairs on one grid, returned as a displacement.

    No parameters and no gradient: the matrix is fitted per pair by :func:`align_affine`
    (CPU, numpy) and turned into the voxel displacement of the grid. Compose it with a
    deformable field by :func:`voxelopt.affine.compose_affine_and_field` or
    ``voxelopt.transform.compose(field, affine_disp)`` (field first, then the affine).

    Args:
        mode: ``"rigid"`` or ``"affine"``.
        spacing_mm: fine-level voxel size of the fit (mm).
        **options: further keyword arguments of :func:`align_affine`.

    Attributes:
        last_results: the :class:`AffineResult` of every pair of the last call.
    """

    def __init__(self, mode: str = "affine", spacing_mm: float = 6.0, **options) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.spacing_mm, self.options = mode, float(spacing_mm), dict(options)
        self.last_results: list[AffineResult] = []

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor, spacing=1.0) -> Tensor:
        """Align each moving image to its fixed image.

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` CT in Hounsfield units.
            moving_hu: ``(B, 1, D, H, W)`` CT in HU on the same grid.
            spacing: voxel size in mm (one number or three, along D, H, W).

        Returns:
            ``(B, 3, D, H, W)`` voxel displacement of each fitted affine
            (``moved(x) = moving(x + u(x))``), on the input's device and dtype.
        """
        from voxelopt.io import Volume

        fixed_hu, moving_hu = check_image_pair(fixed_hu, moving_hu)
        grid = np.diag([*check_spacing(spacing), 1.0])
        shape = tuple(fixed_hu.shape[2:])
        out, self.last_results = [], []
        for f, m in zip(fixed_hu.detach(), moving_hu.detach(), strict=True):
            vols = [
                Volume(x[0].float().cpu().numpy(), grid.copy(), _CANONICAL.copy()) for x in (f, m)
            ]
            result = align_affine(*vols, mode=self.mode, spacing_mm=self.spacing_mm, **self.options)
            self.last_results.append(result)
            out.append(
                affine_displacement(result.matrix, shape, grid, fixed_hu.device, fixed_hu.dtype)
            )
        return torch.cat(out)
