"""The working grid: the resolution the solver runs at, and resampling onto it in bounded memory.

A clinical CT (512 x 512 x 250 voxels of 0.8 x 0.8 x 1.5 mm) is registered on a coarser
*working grid* that covers the same world box: its first and last voxel centres coincide with
the file grid's along every axis (the corner-aligned geometry of
:func:`voxelopt.transform.resize_displacement`), so a field found on it is brought back to the
file grid by a per-axis rescaling. :func:`working_spacing` picks the spacing (the image's own
unless the grid would exceed a voxel budget), :func:`working_grid` builds the grid and
:func:`resample_to_grid` brings any volume onto it through the world (RAS+, mm) coordinates,
optionally through a 4 x 4 world matrix, with a Gaussian anti-aliasing pre-filter wherever it
shrinks. Images are processed in slabs, so neither the filtered nor the sampled image ever
exists whole at the file's resolution beside the input.

Outside the source the value is ``fill_value``: trilinear sampling (images) blends towards it
within one voxel of the outermost voxel centres, nearest neighbour (label maps) takes it beyond
half a voxel, as ``scipy.ndimage.map_coordinates(..., mode="grid-constant")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from voxelopt.io import Volume
from voxelopt.sampling import SlabJob, SlabLayout, antialias_sigma, sample_slabs, separable

__all__ = [
    "DEFAULT_VOXEL_BUDGET",
    "antialias_sigma",
    "grid_of",
    "resample_to_grid",
    "slab_size",
    "working_grid",
    "working_spacing",
]

#: Largest working grid ``auto`` allows: 2.5 M voxels, 2.5 times the paper's 96 x 80 x 128 (2.6 mm
#: for a 360 x 360 x 330 mm chest CT). Measured with ``benchmarks/bench_clinical.py --budgets``
#: (MIND, 2 cores, see BENCHMARKS.md): 1 M -> 2.5 M voxels gained 3.5 Dice points for 1.7x the
#: features + solve time; 4 M only 0.9 more for another 1.6x, and 0.9 GB that would take a
#: 512 x 512 x 250 pair past 4 GB.
DEFAULT_VOXEL_BUDGET = 2_500_000

#: Voxels per slab (bounds the temporaries: about 40 bytes per voxel, 40 MB).
SLAB_VOXELS = 1 << 20
#: Source voxels a slab may read (bounds the copied and filtered source block: 12 bytes each).
SOURCE_SLAB_VOXELS = 1 << 23


def _spacing3(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (float(value),) * 3
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a number or 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} must be a positive number or 3 positive numbers, got {value!r}")
    return out


def _grid_size(n: int, own: float, target: float) -> int:
    """Voxels along one axis of the corner-aligned grid with spacing close to ``target``."""
    if n < 2 or target <= own:
        return n
    return max(2, int(round((n - 1) * own / target)) + 1)


def working_spacing(
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    target: str | float | Sequence[float] = "auto",
    budget_voxels: int = DEFAULT_VOXEL_BUDGET,
) -> tuple[float, float, float]:
    """The spacing (mm per axis) of the grid the solver should run on.

    Never finer than the image: an axis whose own spacing is coarser than the target keeps it.
    ``"auto"`` keeps the image's own spacing when its grid has at most ``budget_voxels``
    voxels; otherwise it coarsens the finest axes first, to the smallest isotropic spacing
    ``s`` (axes already coarser than ``s`` keep theirs) whose grid fits the budget.

    Args:
        shape: ``(D, H, W)`` voxels of the image.
        spacing_mm: its voxel size in mm per axis.
        target: ``"auto"``, or the wanted spacing in mm (one number or one per axis).
        budget_voxels: largest working grid ``"auto"`` allows.

    Returns:
        Requested spacing in mm per axis; :func:`working_grid` realises it up to rounding.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n < 1 for n in shape):
        raise ValueError(f"shape must be 3 positive sizes, got {shape}")
    own = _spacing3(spacing_mm, "spacing_mm")
    if isinstance(target, str):
        if target != "auto":
            raise ValueError(f"spacing must be 'auto' or a size in mm, got {target!r}")
        if not isinstance(budget_voxels, int) or budget_voxels < 8:
            raise ValueError(f"budget_voxels must be an integer >= 8, got {budget_voxels!r}")
        if math.prod(shape) <= budget_voxels:
            return own

        def voxels(s: float) -> int:
            return math.prod(_grid_size(n, o, s) for n, o in zip(shape, own, strict=True))

        lo, hi = min(own), max(max(own), max((n - 1) * o for n, o in zip(shape, own, strict=True)))
        for _ in range(60):  # bisection on s: voxels(s) does not increase with s
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if voxels(mid) <= budget_voxels else (mid, hi)
        return tuple(max(hi, o) for o in own)
    wanted = _spacing3(target, "spacing")
    return tuple(max(w, o) for w, o in zip(wanted, own, strict=True))


def grid_of(volume: Volume) -> Volume:
    """The grid of ``volume`` without its voxels (``data`` is a read-only zero-stride view)."""
    return Volume(
        np.broadcast_to(np.float32(0), volume.shape), volume.affine.copy(), volume.ornt.copy()
    )


def working_grid(volume: Volume, spacing: float | Sequence[float]) -> Volume:
    """The grid with about ``spacing`` mm per axis covering ``volume``'s box of voxel centres.

    Axis ``i`` gets ``round((n_i - 1) s_i / spacing_i) + 1`` voxels (at least 2; unchanged where
    ``spacing_i`` is not coarser than the image), and the affine's columns are scaled so that
    the first and last voxel centres stay where they were: the realised spacing is
    ``(n_i - 1) s_i / (n'_i - 1)``.

    Args:
        volume: the (fixed) image in RAS+ array order.
        spacing: wanted spacing in mm (see :func:`working_spacing`).

    Returns:
        A :class:`~voxelopt.io.Volume` describing the grid: ``shape``, ``affine``, ``spacing``
        and the file orientation of ``volume`` (``ornt``, for writing on it); its ``data`` is a
        read-only zero-stride view that takes no memory.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a voxelopt.io.Volume, got {type(volume).__name__}")
    wanted = _spacing3(spacing, "spacing")
    own = volume.spacing
    shape = tuple(_grid_size(n, o, w) for n, o, w in zip(volume.shape, own, wanted, strict=True))
    affine = volume.affine.astype(np.float64).copy()
    for i, (n, m) in enumerate(zip(volume.shape, shape, strict=True)):
        if m != n:
            affine[:3, i] *= (n - 1) / (m - 1)
    return Volume(np.broadcast_to(np.float32(0), shape), affine, volume.ornt.copy())


def slab_size(out_shape: Sequence[int], source_voxels: int = 0) -> int:
    """Output slices per slab: at most about :data:`SLAB_VOXELS` output voxels and
    :data:`SOURCE_SLAB_VOXELS` source voxels (a shrinking resampling reads many source voxels
    per output voxel)."""
    by_output = SLAB_VOXELS // max(1, int(out_shape[1]) * int(out_shape[2]))
    by_source = SOURCE_SLAB_VOXELS // max(1, -(-source_voxels // int(out_shape[0])))
    return max(1, min(by_output, by_source))


def _check_matrix(matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise ValueError(f"matrix must be a finite invertible 4 x 4 world matrix, got {m.shape}")
    if not np.allclose(m[3], (0, 0, 0, 1)):
        raise ValueError("matrix must be affine: its last row must be 0 0 0 1")
    return m


def resample_to_grid(
    volume: Volume,
    grid: Volume,
    order: int = 1,
    fill_value: float = 0.0,
    matrix: np.ndarray | None = None,
    antialias: bool = True,
) -> Volume:
    """Bring ``volume`` onto ``grid`` through world coordinates, in slabs.

    The grid voxel at world point ``p`` takes ``volume``'s value at ``matrix @ p`` (``p``
    itself without ``matrix``): ``matrix`` maps fixed world points to moving world points, e.g.
    an affine pre-alignment. Where the grid is coarser than ``volume`` along a source axis
    (``order=1`` and ``antialias``), ``volume`` is first smoothed along that axis with a
    Gaussian of :func:`antialias_sigma`; label maps (``order=0``) are never blurred.

    Args:
        volume: source volume (RAS+ array, any grid).
        grid: the target grid (a :class:`~voxelopt.io.Volume`, e.g. :func:`working_grid`).
        order: 1 = trilinear (images, float32 result), 0 = nearest (labels, dtype kept).
        fill_value: value outside ``volume``'s box of voxel centres (e.g. -1000 for CT air).
        matrix: optional ``(4, 4)`` world -> world matrix (mm, RAS+).
        antialias: pre-filter where shrinking (``order=1`` only).

    Returns:
        :class:`~voxelopt.io.Volume` on ``grid`` (its ``ornt``); when the grids coincide and
        no ``matrix`` is given, its ``data`` is ``volume.data`` itself (not copied).
    """
    if not isinstance(volume, Volume) or not isinstance(grid, Volume):
        raise TypeError("volume and grid must be voxelopt.io.Volume objects")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    world = np.eye(4) if matrix is None else _check_matrix(matrix)
    vox = np.linalg.inv(volume.affine) @ world @ grid.affine  # grid index -> source index
    if grid.shape == volume.shape and np.allclose(vox, np.eye(4), atol=1e-6, rtol=0):
        data = volume.data if order == 0 else volume.data.astype(np.float32, copy=False)
        return Volume(data, grid.affine.copy(), grid.ornt.copy(), volume.path)
    step = np.linalg.norm(vox[:3, :3], axis=1)  # grid step along each source axis, in voxels
    sigma = antialias_sigma(step) if (order == 1 and antialias) else (0.0, 0.0, 0.0)
    dtype = np.float32 if order == 1 else volume.data.dtype
    layout = SlabLayout(volume.data, vox, grid.shape, dtype)
    view = layout.out_view
    size = slab_size(view.shape, volume.data.size)

    job = SlabJob(layout.source, view, order, fill_value, tuple(layout.channels(sigma)))
    if order == 0 and not separable(layout.matrix):
        job.is_exact()  # once for all slabs

    def one(start: int) -> None:
        sample_slabs([job], layout.matrix, start, min(view.shape[0], start + size))

    for start in range(0, view.shape[0], size):
        one(start)
    return Volume(layout.out, grid.affine.copy(), grid.ornt.copy(), volume.path)
