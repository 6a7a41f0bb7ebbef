"""Axis-aligned resampling: Gaussian anti-aliasing, then decimation, one axis at a time.

When a grid maps each of its axes onto one axis of the source (scaling, flips, permutations:
no rotation, no displacement), the positions along each source axis form one short list, and
trilinear sampling reads only the source rows at ``floor(p)`` and ``floor(p) + 1``. So the
source block is filtered along one axis, reduced to the rows that are read, filtered along the
next axis on what is left, and so on (the most decimating axis first), and only then sampled:
the same values as filtering the whole array first, for a fraction of the work (a
512 x 512 x 250 CT onto a 2.6 mm grid: 3.8 s -> 1.0-2.2 s). Label maps (nearest neighbour) are
picked by integer indexing, exact for any label value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from voxelopt.transform import grid_sample_3d

__all__ = [
    "TRUNCATE",
    "antialias_sigma",
    "filter_block",
    "filter_block_axis",
    "kernel_radius",
    "sample_separable",
    "separable",
    "separable_positions",
]

#: Gaussian kernels are cut at this many sigmas (scipy's default).
TRUNCATE = 4.0


def antialias_sigma(step: Sequence[float]) -> tuple[float, ...]:
    """Gaussian sigma (source voxels) per source axis for sampling every ``step`` voxels.

    ``sigma = sqrt(step**2 - 1) / 2`` where ``step > 1`` (a voxel's footprint taken as a
    Gaussian of sigma half its size; the filter widens it to half the new size), else 0.
    """
    return tuple(math.sqrt(r * r - 1.0) / 2.0 if r > 1.0 + 1e-3 else 0.0 for r in step)


def kernel_radius(sigma: float) -> int:
    """Half-width in voxels of the truncated Gaussian (scipy's ``int(4 sigma + 0.5)``)."""
    return int(TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def filter_block_axis(block: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian of a float32 block along one axis (replicated borders, cut at 4 sigma).

    ``scipy.ndimage.gaussian_filter1d``'s values; with numba on every thread
    (:func:`voxelopt.kernels.gaussian_filter1d`, bit for bit, 2.6x faster on 2 cores).
    """
    from voxelopt import kernels

    if kernels.numba_available() and block.dtype == np.float32:
        return kernels.gaussian_filter1d(block, sigma, axis, TRUNCATE)
    from scipy import ndimage

    return ndimage.gaussian_filter1d(
        block, sigma, axis=axis, mode="nearest", truncate=TRUNCATE, output=np.float32
    )


def filter_block(block: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Separable Gaussian of a float32 block, one axis after the other (replicated borders)."""
    for axis, s in enumerate(sigma):
        if s > 0 and block.shape[axis] > 1:
            block = filter_block_axis(block, s, axis)
    return block


def separable(matrix: np.ndarray) -> bool:
    """Whether ``matrix`` maps each axis onto one axis (scaling, flips, permutations)."""
    lin = np.asarray(matrix)[:3, :3]
    nz = np.abs(lin) > 1e-12 * max(1.0, float(np.abs(lin).max()))
    return bool(np.all(nz.sum(axis=1) == 1) and np.all(nz.sum(axis=0) == 1))


def separable_positions(matrix: np.ndarray, start: int, stop: int, plane) -> list | None:
    """Per source axis ``r``: (output axis, float64 positions) when ``matrix`` maps each
    output axis onto one source axis (scaling, flips, permutations; no rotation)."""
    if not separable(matrix):
        return None
    lin = matrix[:3, :3]
    nz = np.abs(lin) > 1e-12 * max(1.0, float(np.abs(lin).max()))
    ranges = (np.arange(start, stop), np.arange(plane[0]), np.arange(plane[1]))
    out = []
    for r in range(3):
        c = int(np.flatnonzero(nz[r])[0])
        out.append((c, lin[r, c] * ranges[c].astype(np.float64) + matrix[r, 3]))
    return out


def _needed(p: np.ndarray, n: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices the positions ``p`` read, and ``p`` in the units of that subset."""
    base = np.floor(p) if order == 1 else np.floor(p + 0.5)
    frac = p - base if order == 1 else np.zeros_like(p)
    cand = np.concatenate([base, base + 1]) if order == 1 else base
    need = np.unique(cand[(cand >= 0) & (cand <= n - 1)]).astype(np.int64)
    if need.size == 0:
        return need, p
    k = np.searchsorted(need, base).astype(np.float64)
    k = np.where(base < need[0], base - need[0], k)  # before the array: stays outside
    k = np.where(base > need[-1], need.size - 1 + base - need[-1], k)
    return need, k + frac


def sample_separable(data, positions, out, order, fill, sigma) -> None:
    """Axis-aligned sampling: filter and decimate one axis after the other, then sample the
    small block of the rows actually read (same result as filtering the whole array)."""
    needs, coords = [], []
    for r, (_c, p) in enumerate(positions):
        need, q = _needed(p, data.shape[r], order)
        if need.size == 0:
            out[...] = fill
            return
        needs.append(need)
        coords.append(q)
    if order == 0:
        _pick_separable(data[np.ix_(*needs)], positions, coords, out, fill)
        return
    pads = [kernel_radius(s) for s in sigma]
    lo = [max(0, int(need[0]) - pad) for need, pad in zip(needs, pads, strict=True)]
    ends = zip(data.shape, needs, pads, strict=True)
    hi = [min(n, int(need[-1]) + 1 + pad) for n, need, pad in ends]
    block = np.array(data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    # decimate first where nothing is filtered, then filter the most decimating axes first:
    # every later pass runs on the rows the earlier ones kept
    order = sorted(range(3), key=lambda r: (sigma[r] > 0, needs[r].size / block.shape[r]))
    for r in order:
        if sigma[r] > 0 and block.shape[r] > 1:
            block = filter_block_axis(block, sigma[r], r)
        block = np.take(block, needs[r] - lo[r], axis=r)
    image = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    if fill != 0.0:
        image = image - fill
    grid = torch.empty((1, *out.shape, 3), dtype=torch.float32)
    for r, ((c, _p), q) in enumerate(zip(positions, coords, strict=True)):
        n = image.shape[r]
        scale = 2.0 / (n - 1) if n > 1 else 0.0
        term = torch.from_numpy(q * scale - (1.0 if n > 1 else 0.0)).float()
        view = [1, 1, 1]
        view[c] = -1
        grid[0, ..., 2 - r] = term.view(view)
    values = grid_sample_3d(image[None, None], grid, mode="bilinear", padding_mode="zeros")[0, 0]
    if fill != 0.0:
        values.add_(fill)
    np.copyto(out, values.numpy(), casting="unsafe")


def _pick_separable(block: np.ndarray, positions, coords, out: np.ndarray, fill) -> None:
    """Nearest neighbour of an axis-aligned sampling: integer indexing (exact for any label)."""
    source_of = [next(r for r, (c, _p) in enumerate(positions) if c == axis) for axis in range(3)]
    block = block.transpose(source_of)  # axes in the output's order
    idx, mask = [], np.ones(out.shape, dtype=bool)
    for axis, r in enumerate(source_of):
        q = np.rint(coords[r]).astype(np.int64)
        inside = (q >= 0) & (q < block.shape[axis])
        view = [1, 1, 1]
        view[axis] = -1
        mask &= inside.reshape(view)
        idx.append(np.clip(q, 0, block.shape[axis] - 1))
    values = block[np.ix_(*idx)]
    np.copyto(out, np.where(mask, values, np.asarray(fill, dtype=values.dtype)), casting="unsafe")
