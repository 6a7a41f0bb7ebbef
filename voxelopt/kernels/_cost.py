"""Cost volume in one pass: ``C(x, o) = mean_c |F_c(x) - M_c(x + o)|``, moving zero-padded.

Same arithmetic as :func:`voxelopt.cost.cost_volume` without a graph: the channel sum is
accumulated in channel order starting from channel 0, then multiplied by ``float32(1 / C)``,
so the two agree bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from voxelopt.kernels._entropy import BLOCK
from voxelopt.kernels._entropy import block as entropy_block
from voxelopt.kernels._runtime import parallel_jit

__all__ = ["cost_volume"]


@parallel_jit
def cost_volume(fixed, moving, offsets, inv_channels, out, scale, floor, entropy):
    """Fill ``out`` with the matching cost of every offset, and optionally the entropy.

    Args:
        fixed: ``(B, C, D, H, W)`` float32, C-contiguous.
        moving: same shape as ``fixed``.
        offsets: ``(K, 3)`` int64 offsets ``(dD, dH, dW)`` in voxels.
        inv_channels: ``float32(1 / C)``.
        out: ``(B, K, D, H, W)`` float32 result, written in full.
        scale, floor: float32 ``-1 / beta`` and probability clamp of the entropy.
        entropy: ``(B, D * H * W)`` float32, filled with the displacement entropy (see
            ``_entropy.py``) of each plane while its costs are in cache; ``(0, 0)``: none.
    """
    nb, nc, nd, nh, nw = fixed.shape
    nk = offsets.shape[0]
    flat = out.reshape(nb, nk, nd * nh * nw)
    for bd in prange(nb * nd):
        b, d = bd // nd, bd % nd
        acc = np.empty(nw, np.float32)
        for n in range(nk):
            dd, dh, dw = offsets[n, 0], offsets[n, 1], offsets[n, 2]
            z = d + dd
            lo, hi = max(0, -dw), min(nw, nw - dw)  # columns whose partner lies inside
            for h in range(nh):
                y = h + dh
                inside = 0 <= z < nd and 0 <= y < nh and lo < hi
                for w in range(nw):
                    acc[w] = 0.0
                for c in range(nc):
                    row = fixed[b, c, d, h]
                    if not inside:
                        for w in range(nw):
                            acc[w] += abs(row[w])
                        continue
                    # rows as views, indexed by the loop variable alone: an index with an
                    # offset gets numba's negative-index wrap-around, which stops LLVM from
                    # vectorising the loop (5x slower)
                    here, there, into = (
                        row[lo:hi],
                        moving[b, c, z, y, lo + dw : hi + dw],
                        acc[lo:hi],
                    )
                    for w in range(hi - lo):
                        into[w] += abs(here[w] - there[w])
                    for w in range(lo):
                        acc[w] += abs(row[w])
                    for w in range(hi, nw):
                        acc[w] += abs(row[w])
                target = out[b, n, d, h]
                for w in range(nw):
                    target[w] = acc[w] * inv_channels
        if entropy.shape[0] > 0:  # the plane's 27 cost rows are still in the core's cache
            for start in range(d * nh * nw, (d + 1) * nh * nw, BLOCK):
                stop = min((d + 1) * nh * nw, start + BLOCK)
                entropy_block(flat, b, start, stop, scale, floor, entropy)
