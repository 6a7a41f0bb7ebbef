"""Sampling one volume at affine (plus displacement) positions, one slab of the output at a time.

The core of :func:`voxelopt.grid.resample_to_grid` and :func:`voxelopt.fullres.warp_to_fixed`.
For the output voxels ``x`` of a slab (indices ``start:stop`` along output axis 0, all of axes 1
and 2), the source is read at ``A @ (x + u(x))`` (source voxel indices; ``A`` a 4 x 4 matrix,
``u`` an optional displacement in output voxels). Only the block of source rows those
positions can reach is read (bounded by the slab's corners and the largest displacement), so
memory is bounded by the slab whatever the volume's size. The sampling grid is written in
``grid_sample``'s normalised layout directly (a few passes over the slab), and sampled with
:func:`voxelopt.transform.grid_sample_3d` on every CPU thread.

Outside the source the value is ``fill_value``: trilinear sampling blends towards it within
one voxel of the outermost voxel centres (``grid_sample``'s zero padding of
``data - fill_value``, i.e. ``scipy.ndimage.map_coordinates(..., mode="grid-constant")``);
nearest neighbour takes it beyond half a voxel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from voxelopt import kernels
from voxelopt.separable import (
    antialias_sigma,
    filter_block,
    kernel_radius,
    sample_separable,
    separable,
    separable_positions,
)
from voxelopt.transform import grid_sample_3d

#: Labels up to this magnitude are sampled as float32 (exact); larger ones by a gather.
_EXACT_FLOAT32 = 1 << 24

__all__ = [
    "SlabJob",
    "SlabLayout",
    "antialias_sigma",
    "filter_block",
    "fits_float32",
    "sample_slab",
    "sample_slabs",
    "separable",
]


class SlabLayout:
    """Row-major views of a source and an output array, so that slabs are contiguous.

    Arrays read from NIfTI files are usually column-major (Fortran order): their contiguous
    slabs run along the last axis. For such a source, the output is allocated column-major
    too, and both are handled through their transposes (row-major views): the matrix's rows
    and columns, and a displacement's channels and axes, are reversed to match.

    Attributes:
        source: row-major view of the source.
        out: the output array (``shape``, in the source's memory order).
        out_view: row-major view of ``out``; slabs are cut along its axis 0.
        matrix: ``(4, 4)`` ``out_view`` index -> ``source`` index.
        transposed: whether the views are transposes (then the views' axes 0, 1, 2 are the
            output's axes 2, 1, 0, and a displacement's channels go in that order too).
    """

    def __init__(self, data: np.ndarray, matrix: np.ndarray, shape, dtype) -> None:
        self.transposed = bool(data.flags.f_contiguous and not data.flags.c_contiguous)
        order = "F" if self.transposed else "C"
        self.out = np.empty(tuple(int(n) for n in shape), dtype=dtype, order=order)
        if self.transposed:
            self.source, self.out_view = data.T, self.out.T
            self.matrix = np.asarray(matrix, np.float64)[[2, 1, 0, 3]][:, [2, 1, 0, 3]]
        else:
            self.source, self.out_view, self.matrix = data, self.out, np.asarray(matrix, np.float64)

    def channels(self, values: Sequence[float]) -> list[float]:
        """Per-axis values (e.g. displacement scales) in the views' axis order."""
        return list(values)[::-1] if self.transposed else list(values)


def _block_bounds(matrix, start, stop, plane, shape, disp_bound, pads, narrow_all):
    """Source index ranges ``[lo, hi)`` the slab's positions can reach; ``None`` if none."""
    corners = np.array(
        [
            (i, j, k, 1.0)
            for i in (start, stop - 1)
            for j in (0, plane[0] - 1)
            for k in (0, plane[1] - 1)
        ]
    ).T
    pts = matrix[:3] @ corners
    reach = np.abs(matrix[:3, :3]) @ np.asarray(disp_bound, dtype=np.float64)
    cmin, cmax = pts.min(axis=1) - reach, pts.max(axis=1) + reach
    lo, hi = [0, 0, 0], list(shape)
    for i, n in enumerate(shape):
        if cmax[i] <= -1.0 or cmin[i] >= n:
            return None
        if i == 0 or narrow_all:
            lo[i] = max(0, int(math.floor(max(cmin[i], 0.0))) - pads[i])
            hi[i] = min(n, int(math.floor(min(cmax[i], n - 1.0))) + 2 + pads[i])
    return lo, hi


def _grid(matrix, start, stop, plane, lo, block_shape, disp, disp_scale) -> Tensor:
    """``(1, k, H, W, 3)`` normalised sampling grid of ``matrix @ (x + disp_scale * u(x))``.

    Each grid component is written in one pass when its matrix row has one non-zero entry
    (no rotation: a 1-D term plus one displacement channel), else in one pass per term.
    """
    axes = [
        torch.arange(start, stop, dtype=torch.float64).view(-1, 1, 1),
        torch.arange(plane[0], dtype=torch.float64).view(1, -1, 1),
        torch.arange(plane[1], dtype=torch.float64).view(1, 1, -1),
    ]
    grid = torch.empty((1, stop - start, *plane, 3), dtype=torch.float32)
    for r, n in enumerate(block_shape):
        scale = 2.0 / (n - 1) if n > 1 else 0.0
        row = matrix[r] * scale
        const = row[3] - (lo[r] * scale + 1.0 if n > 1 else 0.0)
        cols = [c for c in range(3) if row[c] != 0]
        g = grid[0, ..., 2 - r]
        if len(cols) == 1:
            c = cols[0]
            term = (row[c] * axes[c] + const).float()
            if disp is None:
                g.copy_(term.expand_as(g))
            else:
                torch.add(term, disp[c], alpha=float(row[c] * disp_scale[c]), out=g)
            continue
        t0 = (row[0] * axes[0] + const).float()
        torch.add(t0 + (row[1] * axes[1]).float(), (row[2] * axes[2]).float(), out=g)
        if disp is not None:
            for c in cols:
                g.add_(disp[c], alpha=float(row[c] * disp_scale[c]))
    return grid


def _gather(data, matrix, start, stop, plane, disp, disp_scale, fill_value) -> np.ndarray:
    """Nearest neighbour by index arithmetic (label values beyond float32's exact range)."""
    idx = np.indices((stop - start, *plane), dtype=np.float64)
    idx[0] += start
    if disp is not None:
        idx += disp.double().numpy() * np.asarray(disp_scale).reshape(3, 1, 1, 1)
    pos = np.tensordot(matrix[:3, :3], idx, axes=1) + matrix[:3, 3].reshape(3, 1, 1, 1)
    pos = np.floor(pos + 0.5).astype(np.int64)
    inside = np.ones(pos.shape[1:], dtype=bool)
    for i, n in enumerate(data.shape):
        inside &= (pos[i] >= 0) & (pos[i] < n)
        np.clip(pos[i], 0, n - 1, out=pos[i])
    values = data[pos[0], pos[1], pos[2]]
    return np.where(inside, values, np.asarray(fill_value, dtype=data.dtype))


@dataclass
class SlabJob:
    """One volume to sample, slab by slab (see :func:`sample_slabs`).

    Attributes:
        data: ``(D, H, W)`` row-major source (float for ``order=1``, integer labels for 0).
        out: row-major output; slabs are cut along its axis 0 (its dtype is kept).
        order: 1 = trilinear, 0 = nearest neighbour.
        fill_value: value outside ``data``.
        sigma: anti-aliasing Gaussian per source axis, in voxels (``order=1``); blocks are
            filtered with margins, so the result equals filtering the whole array first.
        exact: the values are integers float32 holds exactly (labels below 2**24 in size);
            ``False`` samples labels by index arithmetic instead; ``None``: found out when
            first needed (axis-aligned resampling never needs it).
    """

    data: np.ndarray
    out: np.ndarray
    order: int
    fill_value: float = 0.0
    sigma: Sequence[float] = (0.0, 0.0, 0.0)
    exact: bool | None = None

    def is_exact(self) -> bool:
        """:attr:`exact`, computed (one pass over the labels) the first time it is needed."""
        if self.exact is None:
            self.exact = self.order == 1 or fits_float32(self.data)
        return self.exact

    @property
    def smooth(self) -> bool:
        return self.order == 1 and any(s > 0 for s in self.sigma)


def fits_float32(labels: np.ndarray) -> bool:
    """Whether every value of an integer array is exact in float32 (``|v| < 2**24``)."""
    return labels.size == 0 or max(-int(labels.min()), int(labels.max())) < _EXACT_FLOAT32


def sample_slab(
    data: np.ndarray,
    matrix: np.ndarray,
    start: int,
    stop: int,
    out: np.ndarray,
    *,
    order: int,
    fill_value: float = 0.0,
    sigma: Sequence[float] = (0.0, 0.0, 0.0),
    disp: Tensor | None = None,
    disp_scale: Sequence[float] = (1.0, 1.0, 1.0),
    disp_bound: Sequence[float] = (0.0, 0.0, 0.0),
) -> None:
    """Fill ``out`` (the output slab ``start:stop``) with ``data`` sampled at ``matrix @ (x + u)``.

    One-volume form of :func:`sample_slabs` (``out`` is the slab itself here).
    """
    job = SlabJob(data, out, order, fill_value, tuple(sigma))
    sample_slabs(
        [job],
        matrix,
        start,
        stop,
        disp=disp,
        disp_scale=disp_scale,
        disp_bound=disp_bound,
        whole=True,
    )


def sample_slabs(
    jobs: Sequence[SlabJob],
    matrix: np.ndarray,
    start: int,
    stop: int,
    *,
    disp: Tensor | None = None,
    disp_scale: Sequence[float] = (1.0, 1.0, 1.0),
    disp_bound: Sequence[float] = (0.0, 0.0, 0.0),
    whole: bool = False,
) -> None:
    """Sample the output slab ``start:stop`` of every job at ``matrix @ (x + disp_scale * u)``.

    Jobs whose sources share a shape share one sampling grid.

    Args:
        jobs: the volumes, all sampled at the same positions.
        matrix: ``(4, 4)`` output voxel index -> source voxel index (float64).
        start: first output index along axis 0.
        stop: one past the last.
        disp: optional ``(3, stop - start, H', W')`` float32 displacement.
        disp_scale: factor per channel turning ``disp`` into output voxels.
        disp_bound: the largest ``|u|`` per channel (output voxels) over the slab (or more).
        whole: each job's ``out`` is the slab itself rather than the whole output.
    """
    shared: dict[tuple, list] = {}
    for job in jobs:
        out = job.out if whole else job.out[start:stop]
        plane = tuple(out.shape[1:])
        positions = separable_positions(matrix, start, stop, plane) if disp is None else None
        if positions is not None:
            sig = job.sigma if job.order == 1 else (0.0, 0.0, 0.0)
            sample_separable(job.data, positions, out, job.order, float(job.fill_value), sig)
        elif job.smooth or not job.is_exact():
            _sample_one(job, out, matrix, start, stop, disp, disp_scale, disp_bound)
        else:
            shared.setdefault(job.data.shape, []).append((job, out))
    for shape, group in shared.items():
        plane = tuple(group[0][1].shape[1:])
        bounds = _block_bounds(matrix, start, stop, plane, shape, disp_bound, (0, 0, 0), False)
        if bounds is None:
            for job, out in group:
                out[...] = job.fill_value
            continue
        lo, hi = bounds
        block_shape = (hi[0] - lo[0], *shape[1:])
        grid = _grid(matrix, start, stop, plane, lo, block_shape, disp, disp_scale)
        for job, out in group:
            _sample_block(job.data[lo[0] : hi[0]], grid, out, job.order, job.fill_value)


def _sample_block(block: np.ndarray, grid: Tensor, out, order: int, fill_value) -> None:
    """``grid_sample`` of a source block (zero padding of ``block - fill``) into ``out``."""
    fill = float(fill_value)
    if block.dtype == np.float32 and fill == 0.0 and block.flags.c_contiguous:
        image = torch.from_numpy(block)  # a view of the source rows: no copy
    else:
        image = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        if fill != 0.0:
            image = image.sub_(fill) if image.data_ptr() != block.ctypes.data else image - fill
    mode = "bilinear" if order == 1 else "nearest"
    if kernels.use_numba("auto", image, grid):  # the same values, 2-3x faster on 2 cores
        values = kernels.grid_sample(image, grid[0], mode)
    else:
        values = grid_sample_3d(image[None, None], grid, mode=mode, padding_mode="zeros")[0, 0]
    if fill != 0.0:
        values.add_(fill)
    np.copyto(out, values.numpy(), casting="unsafe")


def _sample_one(job: SlabJob, out, matrix, start, stop, disp, disp_scale, disp_bound) -> None:
    """A job that cannot share the grid: anti-aliased blocks, or labels beyond float32."""
    plane = tuple(out.shape[1:])
    if not job.is_exact():
        out[...] = _gather(job.data, matrix, start, stop, plane, disp, disp_scale, job.fill_value)
        return
    pads = [kernel_radius(s) for s in job.sigma]
    bounds = _block_bounds(matrix, start, stop, plane, job.data.shape, disp_bound, pads, True)
    if bounds is None:
        out[...] = job.fill_value
        return
    lo, hi = bounds
    block = np.array(job.data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    block = filter_block(block, job.sigma)
    grid = _grid(matrix, start, stop, plane, lo, block.shape, disp, disp_scale)
    _sample_block(block, grid, out, job.order, job.fill_value)
