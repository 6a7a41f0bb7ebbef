"""Local cost volumes: how badly each candidate offset matches, per voxel.

For features ``F`` (fixed) and ``M`` (moving), search half-width ``k`` and every integer offset
``o`` in ``{-k..k}^3`` (voxels):

    C(x, o) = mean_c |F_c(x) - M_c(x + o)|        (moving padded with zeros)

Lower is better. Both volumes are zero-padded once and flattened; on the padded grid an offset
is a constant shift of the flat index, so each offset compares two contiguous slices. No
unfolded windows are materialised: beyond the output, the working memory is two single-channel
buffers.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from voxelopt import kernels

__all__ = ["cost_volume", "search_offsets"]


def search_offsets(
    kernel_size: int = 1, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """The candidate offsets of a level, in the channel order of :func:`cost_volume`.

    Args:
        kernel_size: search half-width ``k >= 1``.
        device: device of the result.
        dtype: dtype of the result (default: torch's default dtype).

    Returns:
        ``((2k+1)^3, 3)`` tensor; row ``i`` is the offset ``(dD, dH, dW)`` in voxels of channel
        ``i``. The zero offset comes first, then the others with the last axis fastest, so that
        a hard argmin over exactly tied costs (flat, featureless regions such as air) keeps the
        voxel where it is instead of drifting to ``(-k, -k, -k)``.
    """
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an integer >= 1, got {kernel_size!r}")
    r = range(-kernel_size, kernel_size + 1)
    ordered = [(0, 0, 0)] + [o for o in itertools.product(r, r, r) if o != (0, 0, 0)]
    return torch.tensor(ordered, device=device, dtype=dtype or torch.get_default_dtype())


def cost_volume(
    fixed: Tensor, moving: Tensor, kernel_size: int = 1, backend: str = "torch"
) -> Tensor:
    """L1 matching cost of every local offset.

    Args:
        fixed: ``(B, C, D, H, W)`` fixed features.
        moving: ``(B, C, D, H, W)`` moving features on the same grid.
        kernel_size: search half-width ``k``; ``(2k+1)^3`` offsets.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.cost_volume`, the same
            values bit for bit) or ``"auto"`` (see :func:`voxelopt.kernels.use_numba`).

    Returns:
        ``(B, (2k+1)^3, D, H, W)`` cost, channel order as :func:`search_offsets`; differentiable
        with respect to both inputs.
    """
    if fixed.dim() != 5 or moving.dim() != 5:
        raise ValueError(
            f"fixed and moving must be (B, C, D, H, W), got {tuple(fixed.shape)} and "
            f"{tuple(moving.shape)}"
        )
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed and moving shapes differ: {tuple(fixed.shape)} vs {tuple(moving.shape)}"
        )
    if kernels.use_numba(backend, fixed, moving):
        return kernels.cost_volume(fixed, moving, kernel_size)
    k = kernel_size
    b, c, d, h, w = fixed.shape
    # Zero-pad both volumes by k and flatten: on the padded grid an offset o is a constant
    # shift s(o) of the flat index, so every offset compares two contiguous slices.
    dp, hp, wp = d + 2 * k, h + 2 * k, w + 2 * k
    length = dp * hp * wp
    start = k * (hp * wp + wp + 1)  # flat index of the first interior voxel = max |s(o)|
    span = length - 2 * start  # the flat range that holds every interior voxel
    pad = (k, k, k, k, k, k)
    fixed_flat = F.pad(fixed, pad).flatten(2)[..., start : start + span]
    moving_flat = F.pad(moving, pad).flatten(2)
    shifts = [i * hp * wp + j * wp + l for i, j, l in search_offsets(k).long().tolist()]

    if torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad):
        costs = []
        for s in shifts:
            flat = (fixed_flat - moving_flat[..., start + s : start + s + span]).abs().sum(1)
            costs.append(F.pad(flat, (0, 2 * start)).view(b, dp, hp, wp)[:, :d, :h, :w])
        return torch.stack(costs, dim=1) / c

    # No graph: the channel sum is accumulated one channel at a time, so the two
    # single-channel buffers stay in cache while the features stream past (a (B, C, N)
    # difference volume, its abs and its sum took three sweeps of C x N floats per offset).
    out = fixed.new_empty((b, len(shifts), d, h, w))
    summed = fixed.new_empty((b, span))
    diff = torch.empty_like(summed)
    interior = (b, d, h, w), (span, hp * wp, wp, 1)  # interior voxels inside `summed`
    for n, s in enumerate(shifts):
        shifted = moving_flat[..., start + s : start + s + span]
        torch.sub(fixed_flat[:, 0], shifted[:, 0], out=summed).abs_()
        for channel in range(1, c):
            torch.sub(fixed_flat[:, channel], shifted[:, channel], out=diff)
            summed.add_(diff.abs_())
        out[:, n].copy_(summed.as_strided(*interior))
    return out.mul_(1.0 / c)
