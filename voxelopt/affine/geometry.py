"""World matrices of the affine stage, as displacements and as resampling.

Conventions:

* A *world matrix* ``M`` is a ``(4, 4)`` map of RAS+ millimetres from the fixed image's world
  to the moving image's world, in the sampling ("pull") direction of the Learn2Reg
  displacement: the fixed-space point ``p`` corresponds to the moving-space point ``M @ p``,
  and the aligned moving image is ``moving(M @ p)``.
* A *grid* is a ``(D, H, W)`` shape with a ``(4, 4)`` voxel -> world matrix ``G``.
* On a grid where the moving image was resampled through the identity world map
  (:func:`voxelopt.io.resample_to`), the affine is the voxel displacement
  ``u_A(x) = G^-1 M G x - x`` (:func:`affine_displacement`).
* A deformable field ``u_D`` found between the fixed image and the affinely aligned moving
  image (``moving(M G (x + u_D(x)))``, :func:`resample_moving`) combines with the affine into
  ``u(x) = u_D(x) + u_A(x + u_D(x)) = u_A(x) + L u_D(x)`` (``L`` = linear part of
  ``G^-1 M G``): the deformable field is applied first, at the fixed grid, and the affine
  after it (:func:`compose_affine_and_field`). That is ``voxelopt.transform.compose(u_D,
  u_A)``, computed here exactly (no interpolation of ``u_A``, no border effect).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from voxelopt.affine.levels import memory_order_view
from voxelopt.transform import check_displacement, grid_sample_3d

__all__ = [
    "affine_displacement",
    "check_matrix",
    "compose_affine_and_field",
    "resample_moving",
    "voxel_matrix",
]

#: output voxels sampled per chunk by :func:`resample_moving` (bounded memory)
CHUNK_VOXELS = 1 << 22


def check_matrix(matrix, name: str = "matrix") -> np.ndarray:
    """Validate a ``(4, 4)`` world matrix: finite, invertible, last row ``0 0 0 1``.

    Args:
        matrix: array-like or tensor ``(4, 4)``.
        name: how to call it in the error message.

    Returns:
        ``(4, 4)`` float64 numpy array.
    """
    if isinstance(matrix, Tensor):
        matrix = matrix.detach().cpu().numpy()
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a (4, 4) numeric array, got {type(matrix).__name__}"
        ) from None
    if m.shape != (4, 4):
        raise ValueError(f"{name} must be a (4, 4) matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} must be finite, got {m.tolist()}")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ValueError(f"{name} must have the last row 0 0 0 1, got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise ValueError(f"{name} must be invertible, its linear part is singular")
    return m


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (D, H, W), got {shape}")
    return shape


def voxel_matrix(matrix, grid_affine, moving_affine=None) -> np.ndarray:
    """The world matrix as a voxel -> voxel map ``Gm^-1 M G``.

    Args:
        matrix: ``(4, 4)`` world matrix (fixed world -> moving world, RAS+ mm).
        grid_affine: ``(4, 4)`` voxel -> world matrix ``G`` of the (fixed) grid.
        moving_affine: voxel -> world ``Gm`` of the grid the moving image lies on; default
            ``grid_affine`` (moving resampled onto the fixed grid by the identity world map).

    Returns:
        ``(4, 4)`` float64 map from grid voxel indices to moving voxel indices.
    """
    m = check_matrix(matrix)
    g = check_matrix(grid_affine, "grid_affine")
    gm = g if moving_affine is None else check_matrix(moving_affine, "moving_affine")
    if np.array_equal(m, np.eye(4)) and np.array_equal(g, gm):
        return np.eye(4)  # exact: no round-off for the identity
    return np.linalg.solve(gm, m @ g)


def affine_displacement(
    matrix, shape: Sequence[int], grid_affine, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Voxel displacement of a world matrix on a grid: ``u(x) = G^-1 M G x - x``.

    ``warp(moving_on_grid, u)`` equals ``moving(M @ world(x))`` when ``moving_on_grid`` is the
    moving image resampled onto the grid through the identity world map.

    Args:
        matrix: ``(4, 4)`` world matrix (fixed world -> moving world, RAS+ mm).
        shape: ``(D, H, W)`` of the grid.
        grid_affine: ``(4, 4)`` voxel -> world matrix of the grid.
        device: device of the result.
        dtype: floating dtype of the result.

    Returns:
        ``(1, 3, D, H, W)`` displacement in voxels of the grid.
    """
    shape = _check_shape(shape)
    v = voxel_matrix(matrix, grid_affine)
    lin = torch.as_tensor(v[:3, :3] - np.eye(3), dtype=torch.float64)
    off = torch.as_tensor(v[:3, 3], dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    out = torch.empty((1, 3, *shape), dtype=dtype, device=device)
    for i in range(3):  # u_i = sum_j lin_ij x_j + off_i, built by broadcasting
        comp = off[i] + lin[i, 0] * axes[0].view(-1, 1, 1)
        comp = comp + lin[i, 1] * axes[1].view(1, -1, 1) + lin[i, 2] * axes[2].view(1, 1, -1)
        out[0, i] = comp.to(dtype=dtype, device=device)
    return out


def compose_affine_and_field(matrix, field: Tensor, grid_affine) -> Tensor:
    """One displacement for "deformable field first, then the affine".

    With ``moved(x) = moving(M G (x + u_D(x)))`` (the deformable field ``field`` found against
    the affinely aligned moving image), the total displacement against the moving image
    resampled by the identity world map is ``u(x) = u_A(x) + L u_D(x)``, exactly
    ``voxelopt.transform.compose(field, u_A)`` since ``u_A`` is affine.

    Args:
        matrix: ``(4, 4)`` world matrix (fixed world -> moving world, RAS+ mm).
        field: ``(B, 3, D, H, W)`` deformable displacement in voxels of the grid.
        grid_affine: ``(4, 4)`` voxel -> world matrix of the grid.

    Returns:
        ``(B, 3, D, H, W)`` total displacement, same dtype and device as ``field``.
    """
    check_displacement(field, "field")
    v = voxel_matrix(matrix, grid_affine)
    lin = torch.as_tensor(v[:3, :3], dtype=field.dtype, device=field.device)
    u_a = affine_displacement(matrix, field.shape[2:], grid_affine, field.device, field.dtype)
    return u_a + torch.einsum("ij,bjdhw->bidhw", lin, field)


def _check_volume(volume, name: str):
    from voxelopt.io import Volume

    if not isinstance(volume, Volume):
        raise TypeError(f"{name} must be a voxelopt.io.Volume, got {type(volume).__name__}")
    return volume


def resample_moving(
    fixed_grid,
    moving,
    matrix=None,
    order: int = 1,
    fill_value: float = 0.0,
    displacement: Tensor | None = None,
):
    """Sample ``moving`` at ``M @ world(x + u(x))`` for every voxel ``x`` of ``fixed_grid``.

    Chunked along axis 0 (about ``CHUNK_VOXELS`` output voxels at a time) so memory stays
    bounded for clinical grids; every CPU thread is used (:func:`grid_sample_3d`).

    Args:
        fixed_grid: :class:`voxelopt.io.Volume` whose grid is wanted (its data is unused).
        moving: :class:`voxelopt.io.Volume` to sample.
        matrix: ``(4, 4)`` world matrix (fixed world -> moving world); ``None`` = identity.
        order: 1 = trilinear (images, float32), 0 = nearest (label maps, dtype kept).
        fill_value: value outside the moving field of view (e.g. ``AIR_HU`` for CT).
        displacement: optional ``(1, 3, D, H, W)`` voxel displacement on ``fixed_grid``,
            applied before the matrix (e.g. a total field of :func:`compose_affine_and_field`
            with ``matrix=None``).

    Returns:
        :class:`voxelopt.io.Volume` on ``fixed_grid``'s grid.
    """
    fixed_grid = _check_volume(fixed_grid, "fixed_grid")
    moving = _check_volume(moving, "moving")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    shape = fixed_grid.shape
    if displacement is not None:
        check_displacement(displacement, "displacement")
        if displacement.shape[0] != 1 or tuple(displacement.shape[2:]) != shape:
            raise ValueError(
                f"displacement must be (1, 3, {shape}), got {tuple(displacement.shape)}"
            )
    m = np.eye(4) if matrix is None else check_matrix(matrix)
    v = torch.as_tensor(voxel_matrix(m, fixed_grid.affine, moving.affine), dtype=torch.float64)
    src, perm = memory_order_view(moving.data)  # no copy of a Fortran-ordered array
    n_in = torch.tensor(src.shape[::-1], dtype=torch.float64)  # grid_sample's (x, y, z) sizes
    scale = 2.0 / (n_in - 1).clamp(min=1)
    src = (src - float(fill_value) if fill_value else src)[None, None]
    order_xyz = list(perm[::-1])  # grid component c indexes canonical axis perm[2 - c]
    out = np.empty(shape, dtype=np.float32 if order == 1 else moving.data.dtype)
    step = max(1, CHUNK_VOXELS // (shape[1] * shape[2]))
    hw = torch.stack(
        torch.meshgrid(
            torch.arange(shape[1], dtype=torch.float64),
            torch.arange(shape[2], dtype=torch.float64),
            indexing="ij",
        ),
        dim=-1,
    )
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        d = torch.arange(start, stop, dtype=torch.float64).view(-1, 1, 1, 1)
        x = torch.cat([d.expand(-1, *shape[1:], 1), hw.expand(stop - start, -1, -1, -1)], -1)
        if displacement is not None:
            x = x + displacement[0, :, start:stop].permute(1, 2, 3, 0).double().cpu()
        q = x @ v[:3, :3].T + v[:3, 3]  # moving voxel indices (d, h, w)
        grid = (q[..., order_xyz] * scale - 1.0).float()[None]
        mode = "bilinear" if order == 1 else "nearest"
        vals = grid_sample_3d(src, grid, mode=mode, padding_mode="zeros")[0, 0] + float(fill_value)
        out[start:stop] = vals.numpy() if order == 1 else vals.round().numpy()
    return fixed_grid.with_data(out)
