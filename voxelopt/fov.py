"""Fields of view: where on the working grid each image has data.

Two scans of different patients rarely cover the same part of the body: after pre-alignment
the working grid (on the fixed image's box) reaches beyond the moving image's box, and a scan
may hold empty slabs at its ends (slices of one constant value: padding, blanked slices). Sampled
there with an air fill, the moving image shows a box edge that the fixed image does not have,
and the solver would stretch the moving body over it.

So for each image :func:`sample_with_coverage` returns, besides the image on the working grid
(cut to its data box first), its *coverage*: 1 where the working voxel maps inside the image's
data box (the box of voxel centres without empty edge slabs, :func:`data_extent`), 0
elsewhere. The solver then treats uncovered voxels as uninformative, does not trust features
that see across the edge, and never lets an offset reach beyond the moving data
(:mod:`voxelopt.masking`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from voxelopt.grid import resample_to_grid
from voxelopt.io import Volume

__all__ = [
    "common_view",
    "coverage",
    "crop_to_extent",
    "data_extent",
    "masks_on_grid",
    "sample_with_coverage",
]

Extent = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _empty(plane: np.ndarray) -> bool:
    """Whether a slice holds no data: every voxel has one value (padding, slices blanked)."""
    return bool(plane.max() == plane.min())


def data_extent(data: np.ndarray) -> Extent:
    """Index range of the data along each axis: the array without its empty edge slabs.

    A slice at an end of an axis is empty when all its voxels have one value: padding
    (-1024 or -3024 HU), slices blanked to air, zeros. Scanned air is noisy and stays (a scan
    clipped at its minimum may lose air-only edge slices, which carry nothing to match
    either). Only the ends are trimmed; constant slices inside the volume stay.

    Args:
        data: ``(D, H, W)`` image.

    Returns:
        ``((lo0, hi0), (lo1, hi1), (lo2, hi2))``: inclusive first and last index of the data per
        axis; the whole array when every slice is empty (nothing to trim against).
    """
    data = np.asarray(data)
    if data.ndim != 3 or data.size == 0:
        raise ValueError(f"data must be a non-empty (D, H, W) array, got shape {data.shape}")
    extent = []
    for axis, n in enumerate(data.shape):

        def plane(i: int, axis: int = axis) -> np.ndarray:
            # a view: np.take copies the whole array first when it is not C-ordered (a
            # NIfTI's Fortran-ordered voxels: 0.22 s per slice of a 512 x 512 x 133 CT)
            return data[(slice(None),) * axis + (i,)]

        lo, hi = 0, n - 1
        while lo <= hi and _empty(plane(lo)):
            lo += 1
        if lo > hi:  # all empty
            return tuple((0, m - 1) for m in data.shape)  # type: ignore[return-value]
        while _empty(plane(hi)):
            hi -= 1
        extent.append((lo, hi))
    return tuple(extent)  # type: ignore[return-value]


def _grid_to_source(volume: Volume, grid: Volume, matrix: np.ndarray | None) -> np.ndarray:
    """``(4, 4)`` map from grid indices to ``volume`` indices (through the world ``matrix``)."""
    world = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    return np.linalg.inv(volume.affine) @ world @ grid.affine


def _source_positions(vox: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """``(D, H, W, 3)`` float64 source indices of every grid voxel (one affine map)."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    a = torch.from_numpy(vox)
    pos = a[:3, 3].clone().expand(*shape, 3).clone()
    for i, ax in enumerate(axes):
        view = [1, 1, 1, 1]
        view[i] = -1
        pos += ax.view(view) * a[:3, i].view(1, 1, 1, 3)
    return pos


def coverage(
    volume: Volume,
    grid: Volume,
    matrix: np.ndarray | None = None,
    extent: Extent | None = None,
    margin: float = 0.0,
) -> np.ndarray | None:
    """Where on ``grid`` the image ``volume`` has data.

    Args:
        volume: the image (RAS+ :class:`~voxelopt.io.Volume`).
        grid: the working grid.
        matrix: optional ``(4, 4)`` world matrix: grid world point ``p`` samples ``volume`` at
            ``matrix @ p``.
        extent: the image's data box in its own indices (default: the whole array; see
            :func:`data_extent`).
        margin: grid voxels beyond the box that still count (0: the box itself).

    Returns:
        ``(D, H, W)`` float32 on ``grid``: 1 where the voxel maps into the data box (within half a
        voxel of its outermost voxel centres), 0 elsewhere; ``None`` when every voxel does.
    """
    extent = extent or tuple((0, n - 1) for n in volume.shape)
    vox = _grid_to_source(volume, grid, matrix)
    pos = _source_positions(vox, grid.shape)
    # a grid step measured along each source axis, in source voxels
    reach = 0.5 + margin * np.abs(vox[:3, :3]).max(axis=1)
    lo = torch.tensor([e[0] - r for e, r in zip(extent, reach, strict=True)], dtype=torch.float64)
    hi = torch.tensor([e[1] + r for e, r in zip(extent, reach, strict=True)], dtype=torch.float64)
    inside = ((pos >= lo) & (pos <= hi)).all(dim=-1)
    if bool(inside.all()):
        return None
    return inside.numpy().astype(np.float32)


def crop_to_extent(volume: Volume, extent: Extent) -> Volume:
    """``volume`` cut to ``extent`` (inclusive index ranges), its affine moved with the cut so
    that every kept voxel stays where it was in world space (a view, no copy)."""
    index = tuple(slice(lo, hi + 1) for lo, hi in extent)
    affine = volume.affine.astype(np.float64).copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([lo for lo, _ in extent], dtype=np.float64)
    return Volume(volume.data[index], affine, volume.ornt.copy(), volume.path)


def _fill_from_border(
    out: np.ndarray, volume: Volume, grid: Volume, matrix, covered: np.ndarray
) -> None:
    """Overwrite ``out`` where ``covered == 0`` with ``volume`` at the nearest point of its box
    (border replication)."""
    extent = tuple((0, n - 1) for n in volume.shape)
    where = np.flatnonzero(covered.reshape(-1) < 0.5)
    if where.size == 0:
        return
    vox = _grid_to_source(volume, grid, matrix)
    idx = np.stack(np.unravel_index(where, grid.shape), axis=1).astype(np.float64)
    src = idx @ vox[:3, :3].T + vox[:3, 3]
    for axis, (lo, hi) in enumerate(extent):
        np.clip(src[:, axis], lo, hi, out=src[:, axis])
    box = volume.data[tuple(slice(lo, hi + 1) for lo, hi in extent)]
    image = torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32))[None, None]
    # grid_sample's (x, y, z) = (W, H, D) order, normalised to [-1, 1] with corners aligned
    norm = [2.0 * (src[:, a] - lo) / max(hi - lo, 1) - 1.0 for a, (lo, hi) in enumerate(extent)]
    points = torch.from_numpy(np.stack(norm[::-1], axis=1).astype(np.float32))
    values = F.grid_sample(
        image,
        points.view(1, -1, 1, 1, 3),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    out.reshape(-1)[where] = values.reshape(-1).numpy()


def sample_with_coverage(
    volume: Volume,
    grid: Volume,
    matrix: np.ndarray | None = None,
    fill_value: float = 0.0,
    margin: float = 0.0,
) -> tuple[Volume, np.ndarray | None]:
    """``volume`` on ``grid`` (anti-aliased, trilinear) and where it has data there.

    The volume is first cut to its data box (:func:`data_extent`), so that constant padding
    slabs are neither blurred into the data by the anti-aliasing nor counted as data. Working
    voxels up to ``margin`` grid voxels beyond the data box still count as covered and take
    the value at the box's nearest point (border replication): a pre-alignment that tilts a
    scan by a degree or two leaves such slivers, and at the coarse pyramid levels a sliver
    on a face would otherwise make the whole face uninformative.

    Args:
        volume: the image (HU for a CT), RAS+.
        grid: the working grid.
        matrix: optional world matrix (see :func:`coverage`).
        fill_value: value beyond the margin (air for a CT).
        margin: grid voxels beyond the data box that still count as covered.

    Returns:
        ``(image, coverage)``: the image on ``grid`` and its ``(D, H, W)`` float32 coverage
        (``None`` when the image covers the whole grid). Beyond the coverage the image is
        border-replicated: the solver does not trust it nor features within the extractor's
        ``context_voxels`` of it (:meth:`voxelopt.VoxelOptRegistration.solver_masks`).
    """
    extent = data_extent(volume.data)
    if extent != tuple((0, n - 1) for n in volume.shape):
        volume = crop_to_extent(volume, extent)
    sampled = resample_to_grid(volume, grid, 1, fill_value, matrix)
    inside = coverage(volume, grid, matrix)
    if inside is None:
        return sampled, None
    data = np.array(sampled.data, dtype=np.float32)  # a copy: the sample may be the input
    _fill_from_border(data, volume, grid, matrix, inside)
    image = Volume(data, sampled.affine, sampled.ornt, sampled.path)
    return image, coverage(volume, grid, matrix, margin=margin)


def common_view(images: list[Volume], covered: list, fill_value: float) -> list[Volume]:
    """Both images with ``fill_value`` wherever either has no data (outside the product of
    their coverages): the feature extractors see the same part of the body in both, which
    matters to networks that look at the whole body (OBELISK crops each image to its body
    and rescales it). The solver does not trust features near that edge either way."""
    if covered[0] is None and covered[1] is None:
        return images
    common = covered[0] if covered[1] is None else covered[1]
    if covered[0] is not None and covered[1] is not None:
        common = covered[0] * covered[1]
    inside = common > 0.5
    return [
        Volume(np.where(inside, v.data, np.float32(fill_value)), v.affine, v.ornt, v.path)
        for v in images
    ]


def masks_on_grid(
    covered: list, user: Sequence[Volume | None], grid: Volume, matrix
) -> list[np.ndarray | None]:
    """``[fixed, moving]`` masks on the working grid: coverage times the user's mask (nonzero =
    inside; the moving one through ``matrix``); ``None`` where neither restricts anything."""
    masks = []
    for cov, mask, m in zip(covered, user, (None, matrix), strict=True):
        if mask is not None:
            inside = resample_to_grid(mask, grid, 0, 0, m).data != 0
            cov = inside.astype(np.float32) if cov is None else cov * inside
        masks.append(cov)
    return masks
