"""Endpoint error between an estimated and a known displacement."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from voxelopt.checks import check_displacement, check_spacing

__all__ = ["endpoint_error"]


def endpoint_error(
    disp: Tensor,
    true_disp: Tensor,
    spacing: float | Sequence[float] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean Euclidean distance between two displacement fields.

    Args:
        disp: ``(B, 3, D, H, W)`` estimated displacement in voxels.
        true_disp: ``(B, 3, D, H, W)`` ground-truth displacement in voxels.
        spacing: voxel size in mm (one number or one per axis); ``None`` gives voxels.
        mask: optional ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` boolean region to average over.

    Returns:
        ``(B,)`` mean endpoint error, in mm if ``spacing`` is given, else in voxels.
    """
    check_displacement(disp)
    check_displacement(true_disp, "true_disp")
    if disp.shape != true_disp.shape:
        raise ValueError(
            f"displacements differ in shape: {tuple(disp.shape)} vs {tuple(true_disp.shape)}"
        )
    diff = disp - true_disp.to(disp.dtype)
    if spacing is not None:
        s = torch.tensor(check_spacing(spacing), dtype=disp.dtype, device=disp.device)
        diff = diff * s.view(1, 3, 1, 1, 1)
    err = diff.norm(dim=1)  # (B, D, H, W)
    if mask is None:
        return err.flatten(1).mean(dim=1)
    mask = mask.reshape(err.shape) if mask.dim() == 5 else mask
    if mask.shape != err.shape:
        raise ValueError(f"mask must be (B, 1, D, H, W) like disp, got {tuple(mask.shape)}")
    m = mask.to(err.dtype).flatten(1)
    return (err.flatten(1) * m).sum(1) / m.sum(1)
