"""Spatial transforms on dense displacement fields.

Convention (used everywhere in the project):

* Images and features are ``(B, C, D, H, W)``.
* A displacement ``u`` is ``(B, 3, D, H, W)`` in voxels of the grid it lives on; channel ``i``
  is the displacement along spatial axis ``i`` (0 = D, 1 = H, 2 = W).
* Warping samples the moving image: ``warp(M, u)(x) = M(x + u(x))`` (the Learn2Reg convention:
  a fixed voxel ``x`` looks up the moving image at ``x + u(x)``).
* Voxel centres sit at integer coordinates ``0 .. n-1``; sampling uses ``grid_sample`` with
  ``align_corners=True`` so that these coordinates map exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from voxelopt import devices, kernels
from voxelopt.checks import check_displacement

__all__ = [
    "check_displacement",
    "compose",
    "grid_sample_3d",
    "identity_grid",
    "integrate_velocity",
    "pyramid_shapes",
    "resize_displacement",
    "resize_volume",
    "warp",
]


def identity_grid(
    shape: Sequence[int], device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Voxel coordinates of a grid.

    Args:
        shape: spatial size ``(D, H, W)``.
        device: device of the result.
        dtype: floating dtype of the result (default: torch's default dtype).

    Returns:
        ``(1, 3, D, H, W)`` tensor whose channel ``i`` holds the coordinate along axis ``i``.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be (D, H, W), got {tuple(shape)}")
    axes = [torch.arange(n, device=device, dtype=dtype or torch.get_default_dtype()) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


@functools.lru_cache(maxsize=8)
def _normalised_axes(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[list[Tensor], list[float]]:
    """Per spatial axis ``i``, the ``grid_sample`` coordinate of every voxel index as a
    broadcastable ``(1, D, 1, 1)`` / ``(1, 1, H, 1)`` / ``(1, 1, 1, W)`` tensor, and the scale
    from voxels to those normalised units."""
    scales = [2.0 / max(n - 1, 1) for n in shape]
    axes = []
    for i, (n, scale) in enumerate(zip(shape, scales, strict=True)):
        view = [1, 1, 1, 1]
        view[1 + i] = n
        axes.append((torch.arange(n, device=device, dtype=dtype) * scale - 1.0).view(view))
    return axes, scales


def _sampling_grid(disp: Tensor) -> Tensor:
    """``grid_sample`` grid ``(B, D, H, W, 3)`` (x = W, y = H, z = D order) for ``x + u(x)``.

    Channel ``i`` of ``disp`` (axis ``i``) goes to grid component ``2 - i``: one fused
    ``axis + scale * u_i`` per axis, written straight into the interleaved grid.
    """
    axes, scales = _normalised_axes(tuple(disp.shape[2:]), disp.device, disp.dtype)
    if torch.is_grad_enabled() and disp.requires_grad:
        return torch.stack([axes[i] + disp[:, i] * scales[i] for i in (2, 1, 0)], dim=-1)
    grid = disp.new_empty((disp.shape[0], *disp.shape[2:], 3))
    for i in range(3):
        torch.add(axes[i], disp[:, i], alpha=scales[i], out=grid[..., 2 - i])
    return grid


def warp(
    image: Tensor,
    disp: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    backend: str = "torch",
) -> Tensor:
    """Warp ``image`` by a displacement: ``out(x) = image(x + disp(x))``.

    Args:
        image: ``(B, C, D, H, W)`` on the same grid as ``disp`` (B may be 1 to broadcast).
        disp: ``(B, 3, D, H, W)`` displacement in voxels.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (for label maps).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.warp`, equal to float
            rounding; bilinear with zero or border padding only) or ``"auto"``.

    Returns:
        ``(B, C, D, H, W)`` warped image, same dtype as ``image``.
    """
    check_displacement(disp)
    if image.dim() != 5:
        raise ValueError(f"image must have shape (B, C, D, H, W), got {tuple(image.shape)}")
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(
            f"image grid {tuple(image.shape[2:])} does not match displacement grid "
            f"{tuple(disp.shape[2:])}"
        )
    if image.shape[0] not in (1, disp.shape[0]):
        raise ValueError(
            f"batch sizes differ: image {image.shape[0]}, displacement {disp.shape[0]}"
        )
    if _numba_sampling(backend, mode, padding_mode, image, disp):
        return kernels.warp(image, disp, padding_mode)  # broadcasts a batch-1 image itself
    if image.shape[0] != disp.shape[0]:
        image = image.expand(disp.shape[0], *image.shape[1:])
    grid = _sampling_grid(disp)
    src = image if image.is_floating_point() else image.to(disp.dtype)
    if src.dtype != grid.dtype:
        grid = grid.to(src.dtype)
    out = grid_sample_3d(src, grid, mode=mode, padding_mode=padding_mode)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def _numba_sampling(backend: str, mode: str, padding_mode: str, *tensors: Tensor) -> bool:
    """Whether a warp runs on :mod:`voxelopt.kernels` (trilinear, zero or border padding)."""
    if backend == "torch":
        return False
    if mode != "bilinear" or padding_mode not in ("zeros", "border"):
        if backend == "numba":
            raise ValueError(
                f"backend='numba' samples bilinear with zeros or border padding only, got "
                f"mode={mode!r}, padding_mode={padding_mode!r}"
            )
        return False
    return kernels.use_numba(backend, *tensors)


def _cpu_chunks(batch: int, voxels: int) -> int:
    """How many pieces a CPU ``grid_sample`` of one sample should be cut into (1: none)."""
    threads = torch.get_num_threads()
    if batch != 1 or threads < 2:
        return 1
    return next(c for c in range(threads, 0, -1) if voxels % c == 0)


def grid_sample_3d(image: Tensor, grid: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``F.grid_sample`` (``align_corners=True``) of a ``(B, C, D, H, W)`` volume that uses
    every CPU thread.

    ATen's 3-D CPU kernel parallelises over the batch only, so a single pair ran on one
    core. For ``B = 1`` on CPU the output grid is cut into one piece per thread, each piece
    sampling the same image (an expanded view: no copy), and the pieces are put back in order.

    Args:
        image: ``(B, C, D, H, W)`` volume to sample.
        grid: ``(B, D', H', W', 3)`` normalised sampling positions in (x, y, z) order.
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.

    Returns:
        ``(B, C, D', H', W')``, identical to ``F.grid_sample``.
    """
    b, c = image.shape[:2]
    out_shape = grid.shape[1:4]
    chunks = _cpu_chunks(b, out_shape.numel()) if devices.cpu_tiling(image) else 1
    if chunks == 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    pieces = grid.reshape(chunks, -1, 1, 1, 3)
    out = F.grid_sample(
        image.expand(chunks, *image.shape[1:]),
        pieces,
        mode=mode,
        padding_mode=padding_mode,
        align_corners=True,
    )  # (chunks, C, N / chunks, 1, 1)
    return out.view(chunks, c, -1).transpose(0, 1).contiguous().view(1, c, *out_shape)


def compose(
    first: Tensor, second: Tensor, padding_mode: str = "border", backend: str = "torch"
) -> Tensor:
    """Compose two displacements in sampling order.

    The result maps ``x -> x + first(x) -> (x + first(x)) + second(x + first(x))``:
    ``warp(warp(M, second), first) == warp(M, compose(first, second))`` up to interpolation.

    Args:
        first: ``(B, 3, D, H, W)`` displacement applied at the fixed grid.
        second: ``(B, 3, D, H, W)`` displacement evaluated where ``first`` points to.
        padding_mode: padding used when sampling ``second``.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.compose`, one pass) or
            ``"auto"``.

    Returns:
        ``(B, 3, D, H, W)`` composed displacement.
    """
    check_displacement(first, "first")
    check_displacement(second, "second")
    if second.shape[0] in (1, first.shape[0]) and second.shape[2:] == first.shape[2:]:
        if _numba_sampling(backend, "bilinear", padding_mode, first, second):
            return kernels.compose(first, second, padding_mode)
    return first + warp(second, first, padding_mode=padding_mode, backend=backend)


def integrate_velocity(
    velocity: Tensor, steps: int = 7, padding_mode: str = "border", backend: str = "torch"
) -> Tensor:
    """Scaling and squaring of a stationary velocity field.

    ``phi = v / 2**steps``, then ``steps`` times ``phi <- phi + phi(x + phi(x))``.

    Args:
        velocity: ``(B, 3, D, H, W)`` in voxels.
        steps: number of squarings (0 returns the velocity itself).
        padding_mode: padding when the field samples itself.
        backend: ``"torch"``, ``"numba"`` (:func:`voxelopt.kernels.integrate_velocity`, one
            pass per squaring) or ``"auto"``.

    Returns:
        ``(B, 3, D, H, W)`` displacement of the time-1 flow.
    """
    check_displacement(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if _numba_sampling(backend, "bilinear", padding_mode, velocity):
        return kernels.integrate_velocity(velocity, steps, padding_mode)
    phi = velocity / (2**steps)
    for _ in range(steps):
        phi = phi + warp(phi, phi, padding_mode=padding_mode)
    return phi


def resize_volume(volume: Tensor, size: Sequence[int], mode: str = "trilinear") -> Tensor:
    """Resample ``(B, C, D, H, W)`` onto ``size`` with corner voxels aligned."""
    size = tuple(int(s) for s in size)
    if tuple(volume.shape[2:]) == size:
        return volume
    if mode == "nearest":
        # corner-aligned nearest neighbour: output voxel i takes input voxel
        # round(i (n_in - 1) / (n_out - 1)), the same geometry as the trilinear mode
        for axis, (n_out, n_in) in enumerate(zip(size, volume.shape[2:], strict=False)):
            if n_out != n_in:
                pos = torch.linspace(0, n_in - 1, n_out, device=volume.device)
                volume = volume.index_select(2 + axis, pos.round().long())
        return volume
    return F.interpolate(volume, size=size, mode=mode, align_corners=True)


def resize_displacement(disp: Tensor, size: Sequence[int]) -> Tensor:
    """Resample a displacement onto another grid of the same field of view.

    Values are rescaled by ``(n_new - 1) / (n_old - 1)`` per axis so that they stay in voxels
    of the new grid (exactly 2 for the reference's ``2n-1 -> n`` halving; close to 2 otherwise).

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in voxels.
        size: target ``(D', H', W')``.

    Returns:
        ``(B, 3, D', H', W')`` displacement in voxels of the target grid.
    """
    check_displacement(disp)
    old = disp.shape[2:]
    size = tuple(int(s) for s in size)
    if tuple(old) == size:
        return disp
    factor = torch.tensor(
        [(n - 1) / (o - 1) if o > 1 else float(n) / o for n, o in zip(size, old, strict=False)],
        device=disp.device,
        dtype=disp.dtype,
    ).view(1, 3, 1, 1, 1)
    return resize_volume(disp, size) * factor


def pyramid_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Spatial sizes of the pyramid, finest first: each level halves, rounding up.

    Args:
        shape: ``(D, H, W)`` of level 0.
        levels: number of levels.

    Returns:
        ``levels`` tuples, ``[shape, ceil(shape / 2), ...]``.
    """
    shapes = [tuple(int(s) for s in shape)]
    for _ in range(levels - 1):
        shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
    return shapes
