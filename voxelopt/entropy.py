"""Displacement entropy per voxel and the blur strength (sigma) it asks for.

A voxel whose cost volume has one clear minimum is confident (low entropy) and should keep its
own displacement; a voxel with a flat cost (high entropy) should borrow from its neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from voxelopt import devices, kernels

__all__ = ["displacement_entropy", "sigma_map"]

_EPS = 1e-12


def displacement_entropy(
    cost: Tensor, beta: float = 0.1, prob_floor: float = 1e-6, backend: str = "torch"
) -> Tensor:
    """Shannon entropy of the displacement distribution of every voxel.

    ``P(x, .) = softmax(-C(x, .) / beta)`` over the offsets, clamped to ``[prob_floor, 1]`` and
    renormalised (as the reference does), then ``E(x) = -sum_o P log P``.

    Args:
        cost: ``(B, K, D, H, W)`` cost volume (lower is better).
        beta: softmax temperature, in cost units.
        prob_floor: lower clamp of the probabilities before the log.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.displacement_entropy`;
            equal to float rounding) or ``"auto"``.

    Returns:
        ``(B, 1, D, H, W)`` entropy in nats, in ``[0, log K]``.
    """
    if cost.dim() != 5:
        raise ValueError(f"cost must be (B, K, D, H, W), got {tuple(cost.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if kernels.use_numba(backend, cost):
        return kernels.displacement_entropy(cost, beta, prob_floor)
    if torch.is_grad_enabled() and cost.requires_grad:
        prob = torch.softmax(cost * (-1.0 / beta), dim=1)
        prob = prob.clamp(min=prob_floor, max=1.0)
        prob = prob / prob.sum(dim=1, keepdim=True)
        return torch.special.entr(prob).sum(dim=1, keepdim=True)
    return _blocked_entropy(cost, beta, prob_floor)


#: Voxels per block of the graph-free entropy: 27 x 16384 floats (1.7 MB) stay in cache.
_BLOCK = 16384


def _blocked_entropy(cost: Tensor, beta: float, prob_floor: float) -> Tensor:
    """The same as the autograd path, a cache-sized block of voxels at a time.

    Softmax, clamp, renormalisation, ``entr`` and the sum each sweep the whole cost volume
    when applied to it at once (ten passes over ``K x N`` floats); block by block the volume
    is read once and everything else happens in one reused ``(K, block)`` buffer.
    """
    b, k = cost.shape[:2]
    flat = cost.reshape(b, k, -1)
    n = flat.shape[2]
    block = min(_BLOCK, n) if devices.cpu_tiling(cost) else n  # blocks help CPU caches only
    out = cost.new_empty((b, 1, n))
    buffer = cost.new_empty((2, k, block))
    for i in range(b):
        for start in range(0, n, block):
            stop = min(start + block, n)
            p, log_p = buffer[0, :, : stop - start], buffer[1, :, : stop - start]
            torch.mul(flat[i, :, start:stop], -1.0 / beta, out=p)
            p.sub_(p.amax(dim=0, keepdim=True)).exp_()  # softmax over the offsets
            p.div_(p.sum(dim=0, keepdim=True))
            p.clamp_(min=prob_floor, max=1.0)
            p.div_(p.sum(dim=0, keepdim=True))
            # p >= prob_floor > 0, so p log p needs no special case at 0 (special.entr has
            # one, and is 4x slower than log and a product)
            torch.sum(torch.log(p, out=log_p).mul_(p), dim=0, out=out[i, 0, start:stop])
    return out.neg_().view(b, 1, *cost.shape[2:])


def _per_sample(x: Tensor, reduce) -> Tensor:
    return reduce(x.flatten(1), dim=1).values.view(-1, 1, 1, 1, 1)


def sigma_map(
    entropy: Tensor,
    mode: str = "reference",
    sigma_low: float = 0.1,
    sigma_high: float = 0.5,
    alpha: float = 1.5,
    backend: str = "torch",
) -> Tensor:
    """Blur strength of the message passing from the entropy, normalised per sample.

    * ``"reference"``: ``e = (E - min E) / (max E - min E)``, ``sigma = sigma_low +
      log2(e + 1) * (sigma_high - sigma_low)``; the extremes are taken over each sample's own
      volume (the reference takes them over the whole batch, which couples the pairs).
    * ``"paper"`` (Eq. 6): ``sigma = alpha * ln(E / max E + 1)``.

    Args:
        entropy: ``(B, 1, D, H, W)`` displacement entropy.
        mode: ``"reference"`` or ``"paper"``.
        sigma_low: sigma (voxels) of the most confident voxel, reference variant.
        sigma_high: sigma (voxels) of the least confident voxel, reference variant.
        alpha: scale of the paper variant.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.sigma_and_weight`) or
            ``"auto"``.

    Returns:
        ``(B, 1, D, H, W)`` sigma in voxels.
    """
    if entropy.dim() != 5 or entropy.shape[1] != 1:
        raise ValueError(f"entropy must be (B, 1, D, H, W), got {tuple(entropy.shape)}")
    if mode in ("reference", "paper") and kernels.use_numba(backend, entropy):
        return kernels.sigma_and_weight(entropy, mode, sigma_low, sigma_high, alpha)[0]
    if mode == "reference":
        low = _per_sample(entropy, torch.min)
        high = _per_sample(entropy, torch.max)
        e = (entropy - low) / (high - low).clamp(min=_EPS)
        return sigma_low + torch.log2(e + 1.0) * (sigma_high - sigma_low)
    if mode == "paper":
        high = _per_sample(entropy, torch.max)
        return alpha * torch.log(entropy / high.clamp(min=_EPS) + 1.0)
    raise ValueError(f"mode must be 'reference' or 'paper', got {mode!r}")
