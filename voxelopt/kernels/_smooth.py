"""Adaptive 3-tap smoothing: every pass of every iteration in one sweep along D.

Each axis pass of :func:`voxelopt.filtering.smooth` is ``x <- lerp(x, half, 2 w)`` with
``half = lerp(x[i - 1], x[i + 1], 0.5)`` (zero padding). The H and W passes stay inside a
D-plane and the D pass of plane ``d`` reads only planes ``d - 1 .. d + 1``; within a plane, the
D pass of row ``h + 1``, the H pass of row ``h`` and its W pass can run one after the other on
a few rows in L1. The iterations are pipelined along D (see :func:`smooth`). The arithmetic is
ATen's vectorised ``lerp``, so the results equal torch's bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from voxelopt.kernels._runtime import fma, jit, parallel_jit

__all__ = ["smooth"]

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)

# Notes for LLVM's vectoriser (each measured 2-4x faster than the obvious form): loops index
# 1-D row views with the loop variable alone (an index with an offset, ``line[w + 1]``, gets
# numba's negative-index wrap-around), and copies are explicit loops (a slice assignment
# ``a[:] = b`` checks for overlap and may copy through a temporary). A missing neighbour (zero
# padding) is read from a zero row: lerp(0, a, 0.5) = a / 2 and lerp(a, 0, 0.5) = a / 2
# exactly, as torch computes its edges, so one loop serves every voxel.


@jit
def _coefficient(weight):
    """``lerp(x, t, 2 w) = fma(c, t - x, t if c < 0 else x)``: ATen's lerp picks ``c = 2w`` for
    ``2w < 0.5`` (based at ``x``) and ``c = 2w - 1`` (negative, based at ``t``) otherwise."""
    w2 = _TWO * weight
    return w2 if w2 < _HALF else w2 - _ONE


@jit
def _lerp(x, target, c):
    """``torch.lerp(x, target, 2 w)`` as ATen's vectorised CPU kernel rounds it, from
    ``c = _coefficient(w)``."""
    return fma(c, target - x, target if c < _ZERO else x)


@jit
def _mean(before, after):
    """``lerp(before, after, 0.5) = fma(-0.5, after - before, after)``."""
    return fma(-_HALF, after - before, after)


@jit
def _copy(source, target):
    for w in range(source.shape[0]):
        target[w] = source[w]


@jit
def _plane(below, here, above, coefficient, out, padded, line):
    """One smoothing (D, H and W pass) of plane ``here`` into ``out`` (may be ``here``).

    Args:
        below, here, above: ``(H, W)`` planes ``d - 1``, ``d``, ``d + 1`` (zeros beyond).
        coefficient: ``(H, W)`` lerp coefficients of the plane's weights.
        out: ``(H, W)`` result.
        padded: ``(H + 2, W)`` buffer, zero in its first and last row, for the D pass.
        line: ``(W + 2,)`` buffer, zero at both ends, for a row between H and W pass.
    """
    nh, nw = here.shape
    for h in range(nh):  # D pass
        x, lower, upper, c, into = here[h], below[h], above[h], coefficient[h], padded[h + 1]
        for w in range(nw):
            into[w] = _lerp(x[w], _mean(lower[w], upper[w]), c[w])
    left, middle, right = line[:nw], line[1 : nw + 1], line[2:]
    for h in range(nh):
        x, lower, upper, c, result = padded[h + 1], padded[h], padded[h + 2], coefficient[h], out[h]
        for w in range(nw):  # H pass of row h
            middle[w] = _lerp(x[w], _mean(lower[w], upper[w]), c[w])
        for w in range(nw):  # W pass
            result[w] = _lerp(middle[w], _mean(left[w], right[w]), c[w])


@parallel_jit
def smooth(source, target, weight, iterations, slabs):
    """``iterations`` smoothings of every channel in one sweep along D.

    The iterations are pipelined: while iteration 1 filters plane ``s - 1``, iteration ``t``
    filters plane ``s - t`` from three planes of iteration ``t - 1`` that are still in a ring
    buffer, so each channel is read and written once whatever the number of iterations, and
    the working set is ``3 * iterations`` planes. Work items are channels cut into ``slabs``
    ranges of planes; a slab also filters ``iterations`` planes beyond each of its ends (whose
    values it discards) to have correct values at its own ends.

    Args:
        source: ``(B, C, D, H, W)`` float32 input, C-contiguous.
        target: same shape, the result; may be ``source`` itself when ``slabs == 1`` (the
            input planes are copied into the ring before they are overwritten).
        weight: ``(B, 1, D, H, W)`` float32 side weights ``w_1``.
        iterations: number of smoothings (>= 1).
        slabs: pieces each channel is cut into along D (more work items for few channels).
    """
    nb, nc, nd, nh, nw = source.shape
    size = -(-nd // slabs)
    for job in prange(nb * nc * slabs):
        b, c, piece = job // (nc * slabs), (job // slabs) % nc, job % slabs
        first, stop = piece * size, min(nd, (piece + 1) * size)
        if first >= stop:
            continue
        low, high = max(0, first - iterations), min(nd, stop + iterations)
        ring = np.empty((iterations, 3, nh, nw), np.float32)
        coefficients = np.empty((iterations + 1, nh, nw), np.float32)
        zeros = np.zeros((nh, nw), np.float32)  # the padding beyond either end
        padded = np.zeros((nh + 2, nw), np.float32)
        line = np.zeros(nw + 2, np.float32)
        for step in range(low, high + iterations):
            if step < high:  # plane `step` enters the ring, and its coefficients
                entering, slot = source[b, c, step], ring[0, step % 3]
                wts, coef = weight[b, 0, step], coefficients[step % (iterations + 1)]
                for h in range(nh):
                    _copy(entering[h], slot[h])
                    wr, cr = wts[h], coef[h]
                    for w in range(nw):
                        cr[w] = _coefficient(wr[w])
            for t in range(1, iterations + 1):
                j = step - t  # the plane that iteration t filters in this step
                if j < low or j >= high or (t == iterations and not first <= j < stop):
                    continue
                previous = ring[t - 1]
                below = previous[(j + 2) % 3] if j > low else zeros
                above = previous[(j + 1) % 3] if j + 1 < high else zeros
                out = ring[t, j % 3] if t < iterations else target[b, c, j]
                coef = coefficients[j % (iterations + 1)]
                _plane(below, previous[j % 3], above, coef, out, padded, line)
