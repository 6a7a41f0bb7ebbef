"""Message passing as Gaussian filtering with a per-voxel blur strength.

One *smoothing* is three separable 1-D passes (axes D, H, W) of a 3-tap kernel. At voxel ``x``
the kernel is ``w_j(x) ~ exp(-j^2 / (2 sigma(x)^2))`` for ``j in {-1, 0, 1}``, normalised to sum
to one, and gathers from the neighbours (zero padding):

    out(x) = w_0(x) in(x) + w_1(x) (in(x - e) + in(x + e))
           = in(x) + w_1(x) (in(x - e) + in(x + e) - 2 in(x))

so a pass needs only the side weight ``w_1 = a / (1 + 2a)``, ``a = exp(-1 / (2 sigma^2))``.
The non-adaptive ablation uses one fixed sigma for every voxel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from voxelopt import devices, kernels

__all__ = ["adaptive_smooth", "side_weight", "smooth"]


def side_weight(sigma: Tensor | float) -> Tensor | float:
    """Weight of each of the two neighbours of a normalised 3-tap Gaussian.

    Args:
        sigma: blur strength in voxels, a float or a ``(B, 1, D, H, W)`` map (>= 0; 0 keeps the
            voxel's own value).

    Returns:
        ``w_1 = a / (1 + 2a)`` with ``a = exp(-1 / (2 sigma^2))``, same type and shape; in
        ``[0, 1/3)``.
    """
    if isinstance(sigma, Tensor):
        a = torch.exp(-0.5 / sigma.clamp(min=1e-6).square())
        return a / (1.0 + 2.0 * a)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    a = math.exp(-0.5 / max(sigma, 1e-6) ** 2)
    return a / (1.0 + 2.0 * a)


def _axis_pass(x: Tensor, weight: Tensor | float, dim: int) -> Tensor:
    """One 3-tap pass along ``dim`` with zero padding: ``x + w (x[-1] + x[+1] - 2x)``."""
    n = x.shape[dim]
    if n == 1:
        return x - 2.0 * weight * x
    lap = x * -2.0
    lap.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1))
    lap.narrow(dim, 0, n - 1).add_(x.narrow(dim, 1, n - 1))
    if isinstance(weight, Tensor):
        return torch.addcmul(x, lap, weight)
    return x.add(lap, alpha=weight)


def smooth(
    x: Tensor,
    weight: Tensor | float,
    iterations: int = 3,
    inplace: bool = False,
    backend: str = "torch",
) -> Tensor:
    """Repeat the three axis passes ``iterations`` times.

    Args:
        x: ``(B, C, D, H, W)`` signal (a cost volume, or a displacement field).
        weight: side weight from :func:`side_weight`: a float (fixed Gaussian) or a
            ``(B, 1, D, H, W)`` map broadcast over the channels (adaptive).
        iterations: number of smoothings (0 returns ``x``).
        inplace: allow overwriting ``x`` (used for large cost volumes the caller owns). It is
            honoured only when no gradient is being recorded; with autograd the result is
            always a new tensor.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.smooth`, the same values
            bit for bit) or ``"auto"``.

    Returns:
        ``(B, C, D, H, W)`` smoothed signal; differentiable in ``x`` and ``weight``.
    """
    if x.dim() != 5:
        raise ValueError(f"x must be (B, C, D, H, W), got {tuple(x.shape)}")
    if isinstance(weight, Tensor):
        if weight.dim() != 5 or weight.shape[1] != 1 or weight.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"weight map must be (B, 1, D, H, W) = {(x.shape[0], 1, *x.shape[2:])}, "
                f"got {tuple(weight.shape)}"
            )
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
    if iterations == 0:
        return x
    if kernels.use_numba(backend, x, weight if isinstance(weight, Tensor) else None):
        result = kernels.smooth(x, weight, iterations, inplace)
        if result is not None:
            return result
        if backend == "numba":
            raise ValueError("backend='numba' smooths with side weights in [0, 0.5) only")
    recording = torch.is_grad_enabled() and (
        x.requires_grad or (isinstance(weight, Tensor) and weight.requires_grad)
    )
    if recording:
        for _ in range(iterations):
            for dim in (2, 3, 4):
                x = _axis_pass(x, weight, dim)
        return x
    # No graph: in place with one reused buffer. x (1 - 2w) + w (x[-1] + x[+1]) is
    # lerp(x, (x[-1] + x[+1]) / 2, 2w): two memory sweeps per pass (the half-sum is itself a
    # lerp), against four for the plain formula. Channels are filtered independently, so
    # they are taken a few at a time: all 3 * iterations passes of a group run while the
    # group, its buffer and the weight map stay in cache (see BENCHMARKS.md).
    out = x if inplace and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    double_weight = 2.0 * weight
    batch, channels = out.shape[:2]
    group = channels
    if devices.cpu_tiling(out):  # a GPU gains nothing from it and pays a launch per op
        group = max(1, min(channels, _GROUP_ELEMENTS // out[0, 0].numel()))
    half_sum = torch.empty_like(out[:1, :group])
    for b in range(batch):
        w = double_weight[b : b + 1] if isinstance(weight, Tensor) else double_weight
        for start in range(0, channels, group):
            part = out[b : b + 1, start : start + group]
            buffer = half_sum[:, : part.shape[1]]
            for _ in range(iterations):
                for dim in (2, 3, 4):
                    _neighbour_mean(part, dim, buffer)
                    part.lerp_(buffer, w)
    return out


#: Elements of one channel group of :func:`smooth` (4 MB of float32): the group, its
#: half-sum buffer and the weight map together stay within a typical last-level cache.
_GROUP_ELEMENTS = 1 << 20


def _neighbour_mean(x: Tensor, dim: int, out: Tensor) -> None:
    """``out = (x[i - 1] + x[i + 1]) / 2`` along ``dim`` with zero padding."""
    n = x.shape[dim]
    if n == 1:
        out.zero_()
        return
    if n > 2:
        torch.lerp(
            x.narrow(dim, 0, n - 2), x.narrow(dim, 2, n - 2), 0.5, out=out.narrow(dim, 1, n - 2)
        )
    torch.mul(x.narrow(dim, 1, 1), 0.5, out=out.narrow(dim, 0, 1))
    torch.mul(x.narrow(dim, n - 2, 1), 0.5, out=out.narrow(dim, n - 1, 1))


def adaptive_smooth(
    x: Tensor, sigma: Tensor, iterations: int = 3, backend: str = "torch"
) -> Tensor:
    """Smooth ``x`` with the per-voxel Gaussian of blur ``sigma`` (voxels).

    Args:
        x: ``(B, C, D, H, W)``.
        sigma: ``(B, 1, D, H, W)`` blur strength per voxel.
        iterations: number of smoothings.
        backend: ``"torch"``, ``"numba"`` or ``"auto"`` (see :func:`smooth`).

    Returns:
        ``(B, C, D, H, W)``.
    """
    return smooth(x, side_weight(sigma), iterations, backend=backend)
