"""Hard (coupled) argmin over the offsets in one pass over the cost volume.

``argmin_o C(x, o) + gamma ||u(x) - o||^2`` with the tie-breaking of
:func:`voxelopt.solver.hard_argmin`: for at most 32 offsets the coupled value is clamped at 0
and its 5 lowest mantissa bits are replaced by the offset index, so that values equal to
within ``2^-18`` (relative) go to the first offset in channel order (the zero offset); for more
offsets the first exact minimum wins. The coupling is summed in the order of torch's
``(K, 5) x (5, N)`` product: ``o.(-2 gamma u) + gamma |o|^2 + gamma |u|^2``, then added to ``C``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from voxelopt.kernels._runtime import float32_bits, parallel_jit

__all__ = ["hard_argmin"]


@parallel_jit
def hard_argmin(cost, u, gamma, coupled, offsets, mask, out, negative):
    """Fill ``out`` with the chosen offset of every voxel.

    Args:
        cost: ``(B, K, D, H, W)`` float32 cost, C-contiguous.
        u: ``(B, 3, D, H, W)`` float32 current field (ignored unless ``coupled``).
        gamma: float32 coupling weight.
        coupled: whether to add ``gamma ||u - o||^2``.
        offsets: ``(K, 3)`` float32 offsets in voxels.
        mask: the low bits that carry the offset index (``K - 1 <= mask``), or ``0`` for the
            exact first minimum (no clamp, no packing).
        out: ``(B, 3, D, H, W)`` float32 result.
        negative: ``(B * D,)`` uint8, set to 1 for a plane where a value below 0 was seen
            (before the clamp).
    """
    nb, nk, nd, nh, nw = cost.shape
    minus_two_gamma = np.float32(-2.0) * gamma
    keep = np.int32(~mask)
    for bd in prange(nb * nd):
        b, d = bd // nd, bd % nd
        m0 = np.zeros(nw, np.float32)
        m1 = np.zeros(nw, np.float32)
        m2 = np.zeros(nw, np.float32)
        uu = np.zeros(nw, np.float32)
        key = np.empty(nw, np.int32)
        best = np.empty(nw, np.float32)
        index = np.zeros(nw, np.int64)
        seen_negative = False
        for h in range(nh):
            # rows as views indexed by the loop variable alone (vectorised; see _cost.py)
            if coupled:
                u0, u1, u2 = u[b, 0, d, h], u[b, 1, d, h], u[b, 2, d, h]
                for w in range(nw):
                    m0[w] = u0[w] * minus_two_gamma
                    m1[w] = u1[w] * minus_two_gamma
                    m2[w] = u2[w] * minus_two_gamma
                    uu[w] = (u0[w] * u0[w] + u1[w] * u1[w] + u2[w] * u2[w]) * gamma
            for n in range(nk):
                o0, o1, o2 = offsets[n, 0], offsets[n, 1], offsets[n, 2]
                oo = (o0 * o0 + o1 * o1 + o2 * o2) * gamma
                row = cost[b, n, d, h]
                for w in range(nw):
                    value = row[w]
                    if coupled:
                        value = value + ((((o0 * m0[w] + o1 * m1[w]) + o2 * m2[w]) + oo) + uu[w])
                    seen_negative |= value < 0
                    if mask != 0:
                        bits = float32_bits(value) if value > 0 else np.int32(0)
                        packed = (bits & keep) | np.int32(n)
                        key[w] = packed if n == 0 else min(key[w], packed)
                    elif n == 0 or value < best[w]:
                        best[w] = value
                        index[w] = n
            out0, out1, out2 = out[b, 0, d, h], out[b, 1, d, h], out[b, 2, d, h]
            for w in range(nw):
                n = key[w] & mask if mask != 0 else index[w]
                out0[w] = offsets[n, 0]
                out1[w] = offsets[n, 1]
                out2[w] = offsets[n, 2]
        negative[bd] = seen_negative
