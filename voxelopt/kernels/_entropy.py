"""Displacement entropy, and the sigma map and side weights, each in one pass.

Entropy per voxel, as :func:`voxelopt.entropy.displacement_entropy` defines it: ``q =
softmax(-C / beta)`` clamped to ``[floor, 1]``, ``p = q / S`` with ``S = sum q``, ``E = -sum p
log p``. With ``x_o = -C_o / beta - max`` and ``Z = sum exp(x_o)``, ``log q_o = x_o - log Z``
(or ``log floor`` where clamped), so ``E = log S - sum_o q_o log q_o / S``: 27 exps and two logs
per voxel instead of 27 of each, all vectorised (:func:`~voxelopt.kernels._runtime.fast_exp`,
:func:`~voxelopt.kernels._runtime.fast_log`). Results agree with torch's to float rounding.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from voxelopt.kernels._runtime import fast_exp, fast_log, jit, parallel_jit

__all__ = ["block", "entropy", "extremes", "sigma_weight"]

#: Voxels per work item: the (K, block) exponentials stay in the core's L2 cache.
BLOCK = 512

_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_MINUS_HALF = np.float32(-0.5)
_EPS = np.float32(1e-12)  # voxelopt.entropy._EPS
_SIGMA_MIN = np.float32(1e-6)  # voxelopt.filtering.side_weight's clamp
_LOG2E = np.float32(1.4426950408889634)


@jit
def block(cost, b, start, stop, scale, floor, out):
    """Entropy of voxels ``start:stop`` of sample ``b`` of a ``(B, K, N)`` cost into ``out``
    ``(B, N)``; ``scale = float32(-1 / beta)``, ``floor`` the probability clamp."""
    nk, m = cost.shape[1], stop - start
    top = np.empty(m, np.float32)
    total = np.zeros(m, np.float32)
    clamped_total = np.zeros(m, np.float32)
    weighted = np.zeros(m, np.float32)
    exps = np.empty((nk, m), np.float32)
    log_floor = fast_log(floor)
    # rows as views indexed by the loop variable alone (vectorised; see _cost.py)
    row = cost[b, 0, start:stop]
    for i in range(m):
        top[i] = row[i] * scale
    for o in range(1, nk):
        row = cost[b, o, start:stop]
        for i in range(m):
            top[i] = max(top[i], row[i] * scale)
    for o in range(nk):
        row, e = cost[b, o, start:stop], exps[o]
        for i in range(m):
            e[i] = fast_exp(row[i] * scale - top[i])
            total[i] += e[i]
    for i in range(m):
        top[i] += fast_log(total[i])  # now log Z relative to the scaled costs
        total[i] = _ONE / total[i]
    for o in range(nk):
        row, e = cost[b, o, start:stop], exps[o]
        for i in range(m):
            q = e[i] * total[i]
            log_q = row[i] * scale - top[i]
            if q < floor:
                q, log_q = floor, log_floor
            q = min(q, _ONE)
            clamped_total[i] += q
            weighted[i] += q * log_q
    target = out[b, start:stop]
    for i in range(m):
        target[i] = fast_log(clamped_total[i]) - weighted[i] / clamped_total[i]


@parallel_jit
def entropy(cost, scale, floor, out):
    """Fill ``out`` with the entropy (nats) of every voxel.

    Args:
        cost: ``(B, K, N)`` float32 cost, C-contiguous.
        scale: ``float32(-1 / beta)``.
        floor: float32 lower clamp of the probabilities.
        out: ``(B, N)`` float32 result.
    """
    nb, n = cost.shape[0], cost.shape[2]
    blocks = (n + BLOCK - 1) // BLOCK
    for job in prange(nb * blocks):
        b, start = job // blocks, (job % blocks) * BLOCK
        block(cost, b, start, min(n, start + BLOCK), scale, floor, out)


@parallel_jit
def extremes(values, low, high):
    """Per sample and block of ``values`` ``(B, N)``: the minimum and maximum, into ``low``
    and ``high`` ``(B, blocks)`` (``blocks = ceil(N / BLOCK)``)."""
    nb, n = values.shape
    blocks = low.shape[1]
    for job in prange(nb * blocks):
        b, piece = job // blocks, job % blocks
        part = values[b, piece * BLOCK : min(n, (piece + 1) * BLOCK)]
        lo = hi = part[0]
        for i in range(1, part.shape[0]):
            lo = min(lo, part[i])
            hi = max(hi, part[i])
        low[b, piece] = lo
        high[b, piece] = hi


@parallel_jit
def sigma_weight(entropy, low, high, paper, sigma_low, spread, alpha, sigma, weight):
    """Sigma map and side weight ``w_1`` of every voxel.

    Args:
        entropy: ``(B, N)`` float32.
        low: ``(B,)`` float32 per-sample minimum of the entropy.
        high: ``(B,)`` float32 per-sample maximum.
        paper: Eq. 6 (``alpha log(E / max E + 1)``) instead of the reference's
            ``sigma_low + log2(e + 1) spread`` with ``e`` the min-max normalised entropy.
        sigma_low, spread, alpha: float32 constants of the two mappings
            (``spread = sigma_high - sigma_low``).
        sigma: ``(B, N)`` float32 result, blur in voxels.
        weight: ``(B, N)`` float32 result, :func:`voxelopt.filtering.side_weight` of sigma.
    """
    nb, n = entropy.shape
    blocks = (n + BLOCK - 1) // BLOCK
    for job in prange(nb * blocks):
        b, start = job // blocks, (job % blocks) * BLOCK
        lo, hi = low[b], high[b]
        if paper:
            denominator = max(hi, _EPS)
        else:
            denominator = max(hi - lo, _EPS)
        stop = min(n, start + BLOCK)
        part, sig, wgt = entropy[b, start:stop], sigma[b, start:stop], weight[b, start:stop]
        for i in range(stop - start):
            if paper:
                s = alpha * fast_log(part[i] / denominator + _ONE)
            else:
                s = sigma_low + fast_log((part[i] - lo) / denominator + _ONE) * _LOG2E * spread
            sig[i] = s
            c = max(s, _SIGMA_MIN)
            a = fast_exp(_ONE / (c * c) * _MINUS_HALF)
            wgt[i] = a / (a * _TWO + _ONE)
