"""ConvexAdam: coupled convex discrete optimisation + Adam instance optimisation.

Our implementation of the method of Siebert, Hansen and Heinrich ("Fast 3D registration with
accurate optimisation and little learning for Learn2Reg 2021", MICCAI 2021 challenges;
"ConvexAdam: self-configuring dual-optimisation-based 3D multitask medical image
registration", IEEE TMI 2024), written from the published description:

1. MIND-SSC features (radius 1, dilation 2, 12 channels) of both windowed images.
2. Both feature volumes are average-pooled to a coarse grid of spacing ``grid_spacing`` (6).
3. Discrete SSD cost volume on the coarse grid over every integer offset in
   ``{-r..r}^3`` coarse voxels (``r = search_radius = 4``, 729 offsets).
4. Coupled convex optimisation: the argmin of the cost gives ``v``; then, for a rising
   coupling schedule ``lambda``, ``u = smooth(v)`` and
   ``v = argmin_o C(x, o) + lambda ||o - u||^2``.
5. Both directions (fixed -> moving and moving -> fixed) and iterative inverse consistency.
6. The coarse field is upsampled to a grid of spacing ``adam_grid_spacing`` (2) and refined
   by Adam (lr 1, 80 iterations) on MIND similarity (channel-summed SSD) plus a diffusion
   penalty (weight 1.25) of the field smoothed by three box filters; then upsampled to the
   input grid.

Pooled grids are *cell-centred*: coarse voxel ``j`` of spacing ``s`` covers input voxels
``s j .. s j + s - 1`` and sits at ``s j + (s - 1) / 2``. Inputs are padded (replicate) to a
multiple of both spacings so every resampling between the grids is exact
(``F.interpolate(..., align_corners=False)``), and the output is cropped back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelopt.cost import search_offsets
from voxelopt.ct import HU_WINDOW
from voxelopt.features.base import check_image_pair
from voxelopt.features.intensity import window
from voxelopt.features.mind import mind_ssc
from voxelopt.transform import check_displacement, warp

__all__ = [
    "ConvexAdam",
    "ConvexAdamConfig",
    "box_smooth",
    "coupled_convex",
    "instance_optimise",
    "inverse_consistent",
    "rescale_cell_field",
    "ssd_cost_volume",
]


@dataclass(frozen=True)
class ConvexAdamConfig:
    """Every constant of ConvexAdam (defaults: the published ones for abdominal CT).

    Attributes:
        window_low: lower bound (HU) of the CT window applied before MIND.
        window_high: upper bound (HU) of the CT window.
        mind_radius: MIND-SSC patch radius (voxels).
        mind_dilation: MIND-SSC neighbourhood dilation (voxels).
        grid_spacing: spacing (input voxels) of the coarse grid of the discrete step.
        search_radius: search half-width ``r`` of the discrete step in coarse voxels;
            ``(2r+1)^3`` offsets.
        coupling: coupling weights of the coupled convex rounds (in cost units per coarse
            voxel squared), one round each, rising.
        smoothing_iterations: box filters (kernel ``smoothing_kernel``) applied to ``v`` to
            get ``u`` in every coupled round.
        smoothing_kernel: odd size of that box filter (coarse voxels).
        inverse_consistency: solve both directions and make them inverse consistent.
        ic_iterations: fixed-point iterations of the inverse consistency.
        adam_grid_spacing: spacing (input voxels) of the grid of the Adam refinement.
        adam_iterations: Adam steps (0 skips the refinement).
        adam_lr: Adam learning rate (voxels of the Adam grid per step, roughly).
        diffusion_weight: weight of the diffusion penalty (mean squared forward differences
            of the field in Adam-grid voxels, summed over the three axes).
        adam_smoothing: box filters (kernel 3) applied to the optimised field before use.
    """

    window_low: float = HU_WINDOW[0]
    window_high: float = HU_WINDOW[1]
    mind_radius: int = 1
    mind_dilation: int = 2
    grid_spacing: int = 6
    search_radius: int = 4
    coupling: tuple[float, ...] = field(default=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0))
    smoothing_iterations: int = 3
    smoothing_kernel: int = 3
    inverse_consistency: bool = True
    ic_iterations: int = 15
    adam_grid_spacing: int = 2
    adam_iterations: int = 80
    adam_lr: float = 1.0
    diffusion_weight: float = 1.25
    adam_smoothing: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "coupling", tuple(float(c) for c in self.coupling))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message naming the first invalid field."""
        if not self.window_low < self.window_high:
            raise ValueError(
                f"window_low must be < window_high, got {self.window_low} and {self.window_high}"
            )
        positive_ints = (
            "mind_radius",
            "mind_dilation",
            "grid_spacing",
            "search_radius",
            "smoothing_kernel",
            "adam_grid_spacing",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("smoothing_iterations", "ic_iterations", "adam_iterations", "adam_smoothing"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.smoothing_kernel % 2 == 0:
            raise ValueError(f"smoothing_kernel must be odd, got {self.smoothing_kernel}")
        if any(not c >= 0 for c in self.coupling):
            raise ValueError(f"coupling weights must all be >= 0, got {self.coupling!r}")
        if not self.adam_lr > 0:
            raise ValueError(f"adam_lr must be > 0, got {self.adam_lr!r}")
        if not self.diffusion_weight >= 0:
            raise ValueError(f"diffusion_weight must be >= 0, got {self.diffusion_weight!r}")

    def replace(self, **changes) -> ConvexAdamConfig:
        """Return a validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown ConvexAdamConfig field(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        d = asdict(self)
        d["coupling"] = list(self.coupling)
        return d


# --------------------------------------------------------------------------- functional core
def ssd_cost_volume(fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
    """Channel-summed squared difference for every integer offset in ``{-r..r}^3``.

    ``C(x, o) = sum_c (F_c(x) - M_c(x + o))^2`` with the moving volume padded by replicating its
    border. One offset at a time compares the fixed volume with a shifted view of the padded
    moving volume (no unfolded copies).

    Args:
        fixed: ``(B, C, D, H, W)`` fixed features.
        moving: ``(B, C, D, H, W)`` moving features on the same grid.
        radius: search half-width ``r >= 1`` (voxels of this grid).

    Returns:
        ``(B, (2r+1)^3, D, H, W)`` cost, channel ``i`` for offset ``search_offsets(r)[i]``.
    """
    if fixed.dim() != 5 or fixed.shape != moving.shape:
        raise ValueError(
            f"fixed and moving must be equal (B, C, D, H, W) shapes, got {tuple(fixed.shape)} "
            f"and {tuple(moving.shape)}"
        )
    if not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
    b, _, d, h, w = fixed.shape
    r = radius
    padded = F.pad(moving, (r,) * 6, mode="replicate")
    offsets = search_offsets(r).long().tolist()
    cost = fixed.new_empty(b, len(offsets), d, h, w)
    for i, (od, oh, ow) in enumerate(offsets):
        shifted = padded[:, :, r + od : r + od + d, r + oh : r + oh + h, r + ow : r + ow + w]
        cost[:, i] = (fixed - shifted).pow(2).sum(1)
    return cost


def box_smooth(disp: Tensor, iterations: int, kernel: int = 3) -> Tensor:
    """Repeated box (average) filter with replicated borders.

    Args:
        disp: ``(B, C, D, H, W)`` field.
        iterations: number of filters applied in a row (0 returns ``disp``).
        kernel: odd box size (voxels).

    Returns:
        ``(B, C, D, H, W)`` smoothed field; differentiable.
    """
    p = kernel // 2
    for _ in range(iterations):
        disp = F.avg_pool3d(F.pad(disp, (p,) * 6, mode="replicate"), kernel, stride=1)
    return disp


def coupled_convex(
    cost: Tensor,
    offsets: Tensor,
    coupling: tuple[float, ...],
    smoothing_iterations: int = 3,
    smoothing_kernel: int = 3,
) -> Tensor:
    """Coupled convex optimisation of a discrete cost volume.

    ``v = argmin_o C(x, o)``; ``u = smooth(v)``; then for every ``lambda`` of ``coupling``:
    ``v = argmin_o C(x, o) + lambda ||o - u(x)||^2`` and ``u = smooth(v)``.

    Args:
        cost: ``(B, K, D, H, W)`` cost, lower is better.
        offsets: ``(K, 3)`` offsets (voxels) of the cost channels.
        coupling: coupling weights, one round each.
        smoothing_iterations: box filters per smoothing.
        smoothing_kernel: odd box size.

    Returns:
        ``(B, 3, D, H, W)`` smooth displacement ``u`` in voxels of the cost grid.
    """
    if cost.dim() != 5 or offsets.shape != (cost.shape[1], 3):
        raise ValueError(
            f"cost must be (B, K, D, H, W) with offsets (K, 3), got {tuple(cost.shape)} and "
            f"{tuple(offsets.shape)}"
        )
    table = offsets.to(cost)

    def pick(index: Tensor) -> Tensor:  # (B, D, H, W) offset index -> (B, 3, D, H, W)
        return table[index].permute(0, 4, 1, 2, 3)

    u = box_smooth(pick(cost.argmin(1)), smoothing_iterations, smoothing_kernel)
    table_v = table.view(1, -1, 3, 1, 1, 1)
    for lam in coupling:
        penalty = (table_v - u.unsqueeze(1)).pow(2).sum(2)  # (B, K, D, H, W)
        v = pick((cost + lam * penalty).argmin(1))
        u = box_smooth(v, smoothing_iterations, smoothing_kernel)
    return u


def inverse_consistent(forward: Tensor, backward: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Make a pair of opposite displacements inverse consistent by fixed-point iteration.

    Every iteration sets ``f <- (f - b(x + f(x))) / 2`` and ``b <- (b - f(x + b(x))) / 2``
    (simultaneously); an exactly inverse pair (``b(x + f(x)) = -f(x)``) is a fixed point.

    Args:
        forward: ``(B, 3, D, H, W)`` fixed -> moving displacement (voxels).
        backward: ``(B, 3, D, H, W)`` moving -> fixed displacement on the same grid.
        iterations: number of iterations (0 returns the inputs).

    Returns:
        The corrected ``(forward, backward)``.
    """
    check_displacement(forward, "forward")
    check_displacement(backward, "backward")
    for _ in range(iterations):
        forward, backward = (
            0.5 * (forward - warp(backward, forward, padding_mode="border")),
            0.5 * (backward - warp(forward, backward, padding_mode="border")),
        )
    return forward, backward


def rescale_cell_field(disp: Tensor, from_spacing: int, to_spacing: int, size) -> Tensor:
    """Resample a displacement between two cell-centred grids of the same padded extent.

    Args:
        disp: ``(B, 3, n_1, n_2, n_3)`` in voxels of a grid of spacing ``from_spacing``.
        from_spacing: spacing (input voxels) of the source grid.
        to_spacing: spacing (input voxels) of the target grid.
        size: target ``(m_1, m_2, m_3)`` with ``m_i * to_spacing == n_i * from_spacing``.

    Returns:
        ``(B, 3, m_1, m_2, m_3)`` in voxels of the target grid.
    """
    size = tuple(int(s) for s in size)
    for n, m in zip(disp.shape[2:], size, strict=True):
        if n * from_spacing != m * to_spacing:
            raise ValueError(
                f"grids of extents {tuple(disp.shape[2:])} x {from_spacing} and {size} x "
                f"{to_spacing} do not cover the same region"
            )
    out = F.interpolate(disp, size=size, mode="trilinear", align_corners=False)
    return out * (from_spacing / to_spacing)


def instance_optimise(
    fixed: Tensor,
    moving: Tensor,
    init: Tensor,
    iterations: int = 80,
    lr: float = 1.0,
    diffusion_weight: float = 1.25,
    smoothing: int = 3,
) -> Tensor:
    """Adam refinement of a displacement on feature similarity plus a diffusion penalty.

    Loss: ``mean_x sum_c (M_c(x + s(u)(x)) - F_c(x))^2 + w * sum_axes mean (diff s(u))^2``
    where ``s`` is ``smoothing`` box filters of kernel 3 and ``u`` the optimised field.

    Args:
        fixed: ``(B, C, D, H, W)`` fixed features.
        moving: ``(B, C, D, H, W)`` moving features.
        init: ``(B, 3, D, H, W)`` initial displacement (voxels of this grid).
        iterations: Adam steps.
        lr: Adam learning rate.
        diffusion_weight: weight ``w`` of the diffusion penalty.
        smoothing: box filters applied to the field before use.

    Returns:
        ``(B, 3, D, H, W)`` the smoothed optimised field ``s(u)``, detached.
    """
    check_displacement(init, "init")
    fixed, moving = fixed.detach(), moving.detach()
    with torch.enable_grad():
        param = nn.Parameter(init.detach().clone())
        optimiser = torch.optim.Adam([param], lr=lr)
        for _ in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            disp = box_smooth(param, smoothing)
            similarity = (warp(moving, disp) - fixed).pow(2).sum(1).mean()
            diffusion = sum(disp.diff(dim=axis).pow(2).mean() for axis in (2, 3, 4))
            (similarity + diffusion_weight * diffusion).backward()
            optimiser.step()
        return box_smooth(param, smoothing).detach()


# --------------------------------------------------------------------------- module
class ConvexAdam(nn.Module):
    """ConvexAdam as a registration model (no learnable parameters).

    Args:
        config: :class:`ConvexAdamConfig` (default: the published settings).

    The displacement is not differentiable with respect to the images (discrete argmin,
    inner optimisation); ``forward`` works under ``torch.no_grad()`` too.
    """

    def __init__(self, config: ConvexAdamConfig | None = None, **overrides) -> None:
        super().__init__()
        config = config or ConvexAdamConfig()
        if not isinstance(config, ConvexAdamConfig):
            raise TypeError(f"config must be a ConvexAdamConfig, got {type(config).__name__}")
        self.config = config.replace(**overrides) if overrides else config

    def features(self, image_hu: Tensor) -> Tensor:
        """MIND-SSC ``(B, 12, D, H, W)`` of a windowed ``(B, 1, D, H, W)`` HU image."""
        c = self.config
        return mind_ssc(
            window(image_hu, c.window_low, c.window_high),
            radius=c.mind_radius,
            dilation=c.mind_dilation,
        )

    def coarse_displacement(self, fixed_features: Tensor, moving_features: Tensor) -> Tensor:
        """Discrete step on features padded to a multiple of ``grid_spacing``.

        Args:
            fixed_features: ``(B, C, D, H, W)``, every size a multiple of ``grid_spacing``.
            moving_features: same shape.

        Returns:
            ``(B, 3, D/s, H/s, W/s)`` displacement in coarse voxels (``s = grid_spacing``).
        """
        c = self.config
        fixed = F.avg_pool3d(fixed_features, c.grid_spacing)
        moving = F.avg_pool3d(moving_features, c.grid_spacing)
        offsets = search_offsets(c.search_radius, fixed.device, fixed.dtype)

        def solve(a: Tensor, b: Tensor) -> Tensor:
            cost = ssd_cost_volume(a, b, c.search_radius)
            return coupled_convex(
                cost, offsets, c.coupling, c.smoothing_iterations, c.smoothing_kernel
            )

        forward = solve(fixed, moving)
        if c.inverse_consistency:
            forward, _ = inverse_consistent(forward, solve(moving, fixed), c.ic_iterations)
        return forward

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        """Register ``moving_hu`` to ``fixed_hu``.

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` Hounsfield units.
            moving_hu: ``(B, 1, D, H, W)`` Hounsfield units on the same grid.

        Returns:
            ``(B, 3, D, H, W)`` displacement in voxels of the fixed grid,
            ``moved(x) = moving(x + u(x))``.
        """
        fixed_hu, moving_hu = (x.detach() for x in check_image_pair(fixed_hu, moving_hu))
        c = self.config
        shape = fixed_hu.shape[2:]
        unit = math.lcm(c.grid_spacing, c.adam_grid_spacing)
        padded = [-(-n // unit) * unit for n in shape]
        pad = []
        for n, p in zip(reversed(shape), reversed(padded), strict=True):
            pad += [0, p - n]
        with torch.no_grad():
            fixed_f = F.pad(self.features(fixed_hu), pad, mode="replicate")
            moving_f = F.pad(self.features(moving_hu), pad, mode="replicate")
            disp = self.coarse_displacement(fixed_f, moving_f)
            a = c.adam_grid_spacing
            adam_size = [p // a for p in padded]
            disp = rescale_cell_field(disp, c.grid_spacing, a, adam_size)
            fixed_a = F.avg_pool3d(fixed_f, a)
            moving_a = F.avg_pool3d(moving_f, a)
        if c.adam_iterations > 0:
            disp = instance_optimise(
                fixed_a,
                moving_a,
                disp,
                c.adam_iterations,
                c.adam_lr,
                c.diffusion_weight,
                c.adam_smoothing,
            )
        with torch.no_grad():
            disp = rescale_cell_field(disp, a, 1, padded)
        return disp[:, :, : shape[0], : shape[1], : shape[2]].contiguous()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
