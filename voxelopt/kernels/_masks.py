"""Offsets that lead outside the moving data, in one pass over the cost volume.

:meth:`voxelopt.masking.Support.mask_offsets` in torch takes each of the 27 offsets' mask and
cost channel in turn, twice (the voxel's worst valid cost, then the replacement): some 300
small whole-volume operators per level. Here each row of a plane is done while its 27 cost
rows are in cache. The values are the same as torch's bit for bit (a maximum and copies).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from voxelopt.kernels._runtime import parallel_jit

__all__ = ["mask_offsets"]

_HALF = np.float32(0.5)
_LOW = np.float32(-np.inf)


@parallel_jit
def mask_offsets(cost, padded, offsets, k):
    """Set each cost entry whose offset leads outside the moving data to the voxel's largest
    cost over the offsets that stay inside (voxels with none inside are left as they are).

    Args:
        cost: ``(B, K, D, H, W)`` float32, C-contiguous; overwritten.
        padded: ``(B, 1, D + 2k, H + 2k, W + 2k)`` float32 moving mask, replicate-padded by
            ``k``; an offset is inside where it reads more than 0.5.
        offsets: ``(K, 3)`` int64 offsets in voxels, ``|offset| <= k``.
        k: the padding (the search half-width).
    """
    nb, nk, nd, nh, nw = cost.shape
    for bd in prange(nb * nd):
        b, d = bd // nd, bd % nd
        worst = np.empty(nw, np.float32)
        for h in range(nh):
            for w in range(nw):
                worst[w] = _LOW
            for n in range(nk):
                i, j, m = offsets[n, 0], offsets[n, 1], offsets[n, 2]
                inside = padded[b, 0, d + k + i, h + k + j, k + m :]
                row = cost[b, n, d, h]
                for w in range(nw):
                    value = max(worst[w], row[w])
                    worst[w] = value if inside[w] > _HALF else worst[w]
            for n in range(nk):
                i, j, m = offsets[n, 0], offsets[n, 1], offsets[n, 2]
                inside = padded[b, 0, d + k + i, h + k + j, k + m :]
                row = cost[b, n, d, h]
                for w in range(nw):
                    outside = not (inside[w] > _HALF) and worst[w] > _LOW
                    row[w] = worst[w] if outside else row[w]
