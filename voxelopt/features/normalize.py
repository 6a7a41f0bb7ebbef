"""Joint normalisation of a fixed/moving feature pair."""

from __future__ import annotations

import torch
from torch import Tensor

from voxelopt.checks import check_features

__all__ = ["normalize_pair"]


def normalize_pair(
    fixed_feat: Tensor, moving_feat: Tensor, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """L2-normalise over channels, then min-max scale each channel to ``[0, 1]`` jointly.

    The min and max of channel ``c`` are taken over both volumes of the pair together and
    separately for every sample of the batch, so a batch of pairs gives the same result as
    each pair alone. The two volumes may have different grids.

    Args:
        fixed_feat: ``(B, C, D, H, W)`` features of the fixed image.
        moving_feat: ``(B, C, D', H', W')`` features of the moving image.
        eps: guards the L2 norm and a constant channel's zero range.

    Returns:
        ``(fixed, moving)`` with the input shapes, values in ``[0, 1]``.
    """
    check_features(fixed_feat, "fixed_feat")
    check_features(moving_feat, "moving_feat")
    if fixed_feat.shape[:2] != moving_feat.shape[:2]:
        raise ValueError(
            f"fixed_feat and moving_feat must share (B, C), got {tuple(fixed_feat.shape[:2])} "
            f"and {tuple(moving_feat.shape[:2])}"
        )

    def l2(x: Tensor) -> Tensor:
        return x / x.norm(dim=1, keepdim=True).clamp_min(eps)

    f, m = l2(fixed_feat), l2(moving_feat)
    b, c = f.shape[:2]
    lo = torch.minimum(f.reshape(b, c, -1).amin(-1), m.reshape(b, c, -1).amin(-1))
    hi = torch.maximum(f.reshape(b, c, -1).amax(-1), m.reshape(b, c, -1).amax(-1))
    lo, scale = lo.view(b, c, 1, 1, 1), (hi - lo).clamp_min(eps).view(b, c, 1, 1, 1)
    return (f - lo) / scale, (m - lo) / scale
