"""One pyramid level of VoxelOpt: from two feature volumes to a velocity field.

    cost C -> entropy E -> sigma map -> (pre-filtered cost C~)
    v0 = argmin_o C~(x, o);  u = smooth(v0)
    for gamma in schedule:  v = argmin_o C~(x, o) + gamma ||u(x) - o||^2;  u = smooth(v)

The argmin is hard (as published; no gradient flows through the choice of offset) or soft
(the expectation of the offsets under ``softmax(-cost / T)``, differentiable end to end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from voxelopt.config import VoxelOptConfig
from voxelopt.cost import cost_volume, search_offsets
from voxelopt.entropy import displacement_entropy, sigma_map
from voxelopt.filtering import side_weight, smooth

__all__ = ["LevelResult", "offset_argmin", "solve_level"]


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


def offset_argmin(
    cost: Tensor, offsets: Tensor, mode: str = "hard", temperature: float = 0.01
) -> Tensor:
    """The offset of least cost per voxel, hard or soft.

    Args:
        cost: ``(B, K, D, H, W)`` cost per offset.
        offsets: ``(K, 3)`` offsets in voxels (:func:`voxelopt.cost.search_offsets`).
        mode: ``"hard"``: the offset of the minimum (ties: the first in channel order);
            ``"soft"``: ``sum_o softmax(-cost / temperature)_o * o``.
        temperature: soft-argmin temperature in cost units.

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
        # min(dim) returns the first minimum like argmin, and is twice as fast on CPU.
        index = cost.min(dim=1).indices  # (B, D, H, W)
        return offsets.t()[:, index].movedim(0, 1).contiguous()
    if mode == "soft":
        prob = torch.softmax(cost.to(out_dtype) * (-1.0 / temperature), dim=1)
        return torch.einsum("bkdhw,kc->bcdhw", prob, offsets)
    raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")


def _coupled_cost(cost: Tensor, u: Tensor, offsets: Tensor, gamma: float) -> Tensor:
    """``C~(x, o) + gamma (|o|^2 - 2 u(x).o)``, i.e. the coupled cost up to ``gamma |u|^2``."""
    b, k = cost.shape[:2]
    o = offsets.to(device=cost.device, dtype=cost.dtype)
    bias = (gamma * o.square().sum(1)).view(1, k, 1, 1, 1)
    # -2 gamma <o, u(x)> for every offset: a (K, 3) x (3, N) product per sample.
    dot = torch.matmul(o, u.to(cost.dtype).flatten(2)).view_as(cost)
    return (cost + bias).add_(dot, alpha=-2.0 * gamma)


def solve_level(fixed: Tensor, moving: Tensor, config: VoxelOptConfig) -> LevelResult:
    """Solve one level on features already brought onto the same grid.

    Args:
        fixed: ``(B, C, D, H, W)`` fixed features.
        moving: ``(B, C, D, H, W)`` moving features (warped by the coarser levels' field).
        config: the solver configuration.

    Returns:
        :class:`LevelResult` with the level's velocity ``u`` (voxels of this level).
    """
    offsets = search_offsets(config.kernel_size, device=fixed.device)
    cost = cost_volume(fixed, moving, config.kernel_size)
    entropy = displacement_entropy(cost, config.beta, config.prob_floor)

    if config.adaptive:
        sigma = sigma_map(
            entropy, config.sigma_mode, config.sigma_low, config.sigma_high, config.alpha
        )
        weight: Tensor | float = side_weight(sigma)
    else:
        sigma = torch.full_like(entropy, config.fixed_sigma)
        weight = side_weight(config.fixed_sigma)
    iterations = config.smoothing_iterations

    if config.prefilter_cost:
        cost = smooth(cost, weight, iterations, inplace=True)

    def argmin(c: Tensor) -> Tensor:
        return offset_argmin(c, offsets, config.argmin, config.temperature)

    u = smooth(argmin(cost), weight, iterations, inplace=True)
    for gamma in config.gammas:
        u = smooth(argmin(_coupled_cost(cost, u, offsets, gamma)), weight, iterations, inplace=True)
    return LevelResult(velocity=u, entropy=entropy, sigma=sigma)
