"""One pyramid level of VoxelOpt: from two feature volumes to a velocity field.

    cost C -> entropy E -> sigma map -> (pre-filtered cost C~)
    v0 = argmin_o C~(x, o);  u = smooth(v0)
    for gamma in schedule:  v = argmin_o C~(x, o) + gamma ||u(x) - o||^2;  u = smooth(v)

The argmin is hard (as published; no gradient flows through the choice of offset) or soft
(the expectation of the offsets under ``softmax(-cost / T)``, differentiable end to end).

Every step runs on the torch operators or on the fused numba kernels of
:mod:`voxelopt.kernels`, as :func:`level_backend` decides from ``config.backend``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from voxelopt import kernels
from voxelopt.config import VoxelOptConfig
from voxelopt.cost import cost_volume, search_offsets
from voxelopt.entropy import displacement_entropy, sigma_map
from voxelopt.filtering import side_weight, smooth
from voxelopt.masking import Smoothing, Support

__all__ = ["LevelResult", "hard_argmin", "level_backend", "offset_argmin", "solve_level"]


@dataclass
class LevelResult:
    """What one level produces.

    Attributes:
        velocity: ``(B, 3, D, H, W)`` smoothed displacement ``u`` in voxels of the level
            (before integration).
        entropy: ``(B, 1, D, H, W)`` displacement entropy of the raw cost volume (nats).
        sigma: ``(B, 1, D, H, W)`` blur strength in voxels (constant map when not adaptive).
    """

    velocity: Tensor
    entropy: Tensor
    sigma: Tensor


def level_backend(config: VoxelOptConfig, *tensors: Tensor) -> str:
    """``"numba"`` or ``"torch"``: what ``config.backend`` selects for a solve on ``tensors``.

    The numba kernels take the hard argmin only; with ``argmin="soft"`` every step is torch's
    (``backend="numba"`` with the soft argmin is refused by the config itself).
    """
    backend = config.backend if config.argmin == "hard" else "torch"
    return "numba" if kernels.use_numba(backend, *tensors) else "torch"


def offset_argmin(
    cost: Tensor,
    offsets: Tensor,
    mode: str = "hard",
    temperature: float = 0.01,
    backend: str = "torch",
) -> Tensor:
    """The offset of least cost per voxel, hard or soft.

    Args:
        cost: ``(B, K, D, H, W)`` cost per offset.
        offsets: ``(K, 3)`` offsets in voxels (:func:`voxelopt.cost.search_offsets`).
        mode: ``"hard"``: the offset of the minimum (ties: the first in channel order);
            ``"soft"``: ``sum_o softmax(-cost / temperature)_o * o``.
        temperature: soft-argmin temperature in cost units.
        backend: for the hard argmin, ``"torch"``, ``"numba"``
            (:func:`voxelopt.kernels.hard_argmin`, the same choice) or ``"auto"``.

    Returns:
        ``(B, 3, D, H, W)`` displacement in voxels (float32 or the cost's dtype, whichever is
        wider).
    """
    if cost.dim() != 5 or cost.shape[1] != offsets.shape[0]:
        raise ValueError(
            f"cost must be (B, K={offsets.shape[0]}, D, H, W), got {tuple(cost.shape)}"
        )
    out_dtype = torch.promote_types(cost.dtype, torch.float32)
    offsets = offsets.to(device=cost.device, dtype=out_dtype)
    if mode == "hard":
        if kernels.use_numba(backend, cost):
            return kernels.hard_argmin(cost, offsets, exact_if_negative=True)
        return hard_argmin(cost, offsets) if cost.min() >= 0 else _first_min(cost, offsets)
    if mode == "soft":
        prob = torch.softmax(cost.to(out_dtype) * (-1.0 / temperature), dim=1)
        return torch.einsum("bkdhw,kc->bcdhw", prob, offsets)
    raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")


def _first_min(cost: Tensor, offsets: Tensor) -> Tensor:
    """Hard argmin of a cost with negative entries (first minimum wins)."""
    return _gather_offsets(cost.min(dim=1).indices, offsets)


def _gather_offsets(index: Tensor, offsets: Tensor) -> Tensor:
    """``(B, D, H, W)`` offset indices -> ``(B, 3, D, H, W)`` offsets."""
    b = index.shape[0]
    picked = offsets.t().index_select(1, index.reshape(-1)).view(3, b, *index.shape[1:])
    return picked.transpose(0, 1).contiguous()


def _coupled_cost(cost: Tensor, u: Tensor, offsets: Tensor, gamma: float) -> Tensor:
    """``C~(x, o) + gamma (|o|^2 - 2 u(x).o)``, i.e. the coupled cost up to ``gamma |u|^2``."""
    b, k = cost.shape[:2]
    o = offsets.to(device=cost.device, dtype=cost.dtype)
    bias = (gamma * o.square().sum(1)).view(1, k, 1, 1, 1)
    # -2 gamma <o, u(x)> for every offset: a (K, 3) x (3, N) product per sample.
    dot = torch.matmul(o, u.to(cost.dtype).flatten(2)).view_as(cost)
    return (cost + bias).add_(dot, alpha=-2.0 * gamma)


#: Voxels per block of the hard argmin; 27 x 16384 floats (1.7 MB) stay in cache.
_BLOCK = 16384

#: Integer views for packing the offset index into the low mantissa bits, and how many low
#: bits may be given up: 5 of float32's 23 (ties within 2^-18 relative resolve to the first
#: offset, far below the solver's own float32 rounding of the costs), 12 of float64's 52.
_PACKING = {torch.float32: (torch.int32, 5), torch.float64: (torch.int64, 12)}


def _block_argmin(block: Tensor, out: Tensor, order: Tensor | None, mask: int) -> None:
    """First index of the minimum over dim 1 of a non-negative ``(1, K, n)`` block.

    ``torch.min(dim=1)`` with indices is ~7x slower on CPU than a plain ``amin``. For
    non-negative floats the bit patterns sort like the values, so the offset index is written
    into the lowest mantissa bits and one integer ``amin`` gives value and index together.
    ``order`` is the ``(1, K, 1)`` index tensor in the integer dtype (``None`` falls back to
    ``torch.min``) and ``mask`` the low bits it occupies.
    """
    if order is None:
        torch.min(block, dim=1, out=(torch.empty_like(out, dtype=block.dtype), out))
        return
    bits = block.clamp_min_(0).view(order.dtype)  # rounding may leave -1e-9: clamp to 0
    bits.bitwise_and_(~mask).bitwise_or_(order)
    out.copy_(bits.amin(dim=1).bitwise_and_(mask))


@torch.no_grad()
def hard_argmin(
    cost: Tensor,
    offsets: Tensor,
    u: Tensor | None = None,
    gamma: float = 0.0,
    backend: str = "torch",
) -> Tensor:
    """Hard ``argmin_o C~(x, o) + gamma ||u(x) - o||^2`` without a full-size temporary.

    ``gamma ||u - o||^2 = gamma (|o|^2 - 2 u.o + |u|^2)`` is one ``(K, 5) x (5, N)`` product
    (offsets augmented with ``|o|^2`` and 1, the field with ``-2u``, 1 and ``|u|^2``),
    accumulated onto the cost block by block with ``baddbmm`` and reduced at once: each call
    reads the cost volume once and writes nothing of its size. A hard choice has no gradient,
    so none is recorded.

    Args:
        cost: ``(B, K, D, H, W)`` non-negative (pre-filtered) cost.
        offsets: ``(K, 3)`` offsets in voxels.
        u: ``(B, 3, D, H, W)`` current smooth field, or ``None`` for the plain argmin.
        gamma: coupling weight (ignored without ``u``).
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.hard_argmin`: one pass,
            the same tie-breaking) or ``"auto"``.

    Returns:
        ``(B, 3, D, H, W)`` chosen offsets (float32, or float64 for a float64 cost).
    """
    if kernels.use_numba(backend, cost, u):
        return kernels.hard_argmin(cost, offsets, u, gamma)
    b, k = cost.shape[:2]
    n = cost[0, 0].numel()
    dtype, device = cost.dtype, cost.device
    o = offsets.to(device=device, dtype=dtype)
    packing = _PACKING.get(dtype)
    order, mask = None, (1 << (k - 1).bit_length()) - 1
    if packing is not None and k <= 1 << packing[1]:
        order = torch.arange(k, device=device, dtype=packing[0]).view(1, k, 1)
    coupled = u is not None and gamma != 0.0
    if coupled:
        ones = torch.ones((k, 1), device=device, dtype=dtype)
        o_aug = torch.cat([o, o.square().sum(1, keepdim=True), ones], dim=1).unsqueeze(0)
        u_aug = torch.empty((1, 5, n), device=device, dtype=dtype)
    flat = cost.reshape(b, k, n)
    index = torch.empty((b, n), device=device, dtype=torch.long)
    block = torch.empty((1, k, min(_BLOCK, n)), device=device, dtype=dtype)
    for i in range(b):
        if coupled:
            ui = u[i].reshape(1, 3, n).to(dtype)
            torch.mul(ui, -2.0 * gamma, out=u_aug[:, :3])
            u_aug[:, 3].fill_(gamma)
            torch.sum(ui.square(), dim=1, out=u_aug[:, 4]).mul_(gamma)
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            width = stop - start
            buf = block if width == block.shape[2] else block[:, :, :width].contiguous()
            if coupled:
                torch.baddbmm(
                    flat[i : i + 1, :, start:stop], o_aug, u_aug[:, :, start:stop], out=buf
                )
            else:
                buf.copy_(flat[i : i + 1, :, start:stop])
            _block_argmin(buf, index[i : i + 1, start:stop], order, mask)
    out_dtype = torch.promote_types(dtype, torch.float32)
    return _gather_offsets(index.view(b, *cost.shape[2:]), o.to(out_dtype))


def solve_level(
    fixed: Tensor, moving: Tensor, config: VoxelOptConfig, support: Support | None = None
) -> LevelResult:
    """Solve one level on features already brought onto the same grid.

    Args:
        fixed: ``(B, C, D, H, W)`` fixed features.
        moving: ``(B, C, D, H, W)`` moving features (warped by the coarser levels' field).
        config: the solver configuration.
        support: the level's informative voxels (:mod:`voxelopt.masking`), or ``None`` when
            both images have data everywhere (the published method).

    Returns:
        :class:`LevelResult` with the level's velocity ``u`` (voxels of this level).
    """
    backend = level_backend(config, fixed, moving)
    offsets = search_offsets(config.kernel_size, device=fixed.device)
    if support is not None:  # offsets without moving data, then the entropy of what is left
        cost = support.mask_offsets(
            cost_volume(fixed, moving, config.kernel_size, backend), config.kernel_size, backend
        )
        entropy = displacement_entropy(cost, config.beta, config.prob_floor, backend)
    elif backend == "numba":  # the entropy of each plane while its costs are in cache
        cost, entropy = kernels.cost_and_entropy(
            fixed, moving, config.kernel_size, config.beta, config.prob_floor
        )
    else:
        cost = cost_volume(fixed, moving, config.kernel_size)
        entropy = displacement_entropy(cost, config.beta, config.prob_floor)
    normalised = None
    if support is not None:
        entropy, for_sigma = support.entropy_maps(entropy, offsets.shape[0])
        cost = support.flatten_cost(cost)
        sigma, weight = _blur(for_sigma, config, backend)
        normalised = support.smoothing(
            lambda m: smooth(m, weight, config.smoothing_iterations, inplace=True, backend=backend)
        )
    else:
        sigma, weight = _blur(entropy, config, backend)
    iterations = config.smoothing_iterations

    def smoothed(v: Tensor) -> Tensor:
        if normalised is None:
            return smooth(v, weight, iterations, inplace=True, backend=backend)
        v = smooth(normalised.before(v), weight, iterations, inplace=True, backend=backend)
        return normalised.after_field(v)

    if config.prefilter_cost:  # a flattened cost is already w C: S(w C) needs no product
        cost = smooth(cost, weight, iterations, inplace=True, backend=backend)
        if normalised is not None:
            cost = normalised.after_cost(cost)
    if backend == "numba":
        u = _kernel_rounds(cost, offsets, weight, config, normalised)
        return LevelResult(u, entropy, sigma)

    def argmin(c: Tensor) -> Tensor:
        return offset_argmin(c, offsets, config.argmin, config.temperature, backend=backend)

    u = smoothed(argmin(cost))
    for gamma in config.gammas:
        if config.argmin == "hard":
            v = hard_argmin(cost, offsets, u, gamma, backend=backend)
        else:
            v = argmin(_coupled_cost(cost, u, offsets, gamma))
        u = smoothed(v)
    return LevelResult(velocity=u, entropy=entropy, sigma=sigma)


def _kernel_rounds(
    cost: Tensor,
    offsets: Tensor,
    weight: Tensor,
    config: VoxelOptConfig,
    normalised: Smoothing | None = None,
) -> Tensor:
    """The argmin and smoothing rounds of :func:`solve_level` on the numba kernels, with two
    field buffers for all of them (a round's argmin no longer needs the previous ``u`` once
    it has read it) instead of two new fields per round."""
    iterations = config.smoothing_iterations

    def smoothed(v: Tensor, out: Tensor | None) -> Tensor:
        if normalised is not None:
            v = normalised.before(v)
        if iterations == 0:
            result = v.clone()
        else:
            result = kernels.smooth(v, weight, iterations, out=out)
            if result is None:
                result = smooth(v, weight, iterations, backend="numba")
        return result if normalised is None else normalised.after_field(result)

    v = kernels.hard_argmin(cost, offsets, exact_if_negative=True)
    u = smoothed(v, None)
    for gamma in config.gammas:
        kernels.hard_argmin(cost, offsets, u, gamma, out=v)
        u = smoothed(v, u)
    return u


def _blur(entropy: Tensor, config: VoxelOptConfig, backend: str) -> tuple[Tensor, Tensor | float]:
    """The level's sigma map ``(B, 1, D, H, W)`` and the side weight of the smoothing."""
    if not config.adaptive:
        sigma = torch.full_like(entropy, config.fixed_sigma)
        weight = side_weight(config.fixed_sigma)
        # the kernels take a map: one per level rather than one per smoothing
        return sigma, torch.full_like(entropy, weight) if backend == "numba" else weight
    if backend == "numba":  # sigma and its side weight in one pass
        return kernels.sigma_and_weight(
            entropy, config.sigma_mode, config.sigma_low, config.sigma_high, config.alpha
        )
    sigma = sigma_map(entropy, config.sigma_mode, config.sigma_low, config.sigma_high, config.alpha)
    return sigma, side_weight(sigma)
