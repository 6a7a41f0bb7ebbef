"""From the working grid back to the file grid, one slab at a time.

The solver's displacement lives on the working grid (:func:`voxelopt.grid.working_grid`),
whose first and last voxel centres coincide with the fixed file grid's. Its trilinear
upsampling is separable: along the slab axis each output slice mixes two working slices, and
the other two axes are interpolated bilinearly per slice. So any slab of the full-resolution
field (in voxels of the fixed grid) costs only that slab, and the moving image and labels are
warped at full resolution without the full-resolution field ever existing whole:

    for each slab of the fixed grid:  u = upsampled field;  moved = moving(A @ (x + u(x)))

with ``A`` the fixed-index -> moving-index matrix (through world space and an optional 4 x 4
world matrix). The result is that of :func:`voxelopt.transform.resize_displacement` followed by
a whole-volume warp, to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxelopt.grid import _check_matrix, slab_size
from voxelopt.io import Volume
from voxelopt.sampling import SlabJob, SlabLayout, antialias_sigma, fits_float32, sample_slabs

__all__ = [
    "FieldUpsampler",
    "check_corner_aligned",
    "upsample_displacement",
    "voxel_ratio",
    "warp_many",
    "warp_to_fixed",
    "WarpJob",
]


def check_corner_aligned(working: Volume, fixed: Volume, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` unless ``working``'s first and last voxel centres are ``fixed``'s.

    Args:
        working: the working grid (e.g. :func:`voxelopt.grid.working_grid` of ``fixed``).
        fixed: the fixed image's grid.
        atol: tolerance in mm.
    """
    for name, g in (("working", working), ("fixed", fixed)):
        if not isinstance(g, Volume):
            raise TypeError(f"{name} must be a voxelopt.io.Volume, got {type(g).__name__}")
    nw, nf = np.asarray(working.shape), np.asarray(fixed.shape)
    ends_w = working.affine[:3, :3] * np.maximum(nw - 1, 0)
    ends_f = fixed.affine[:3, :3] * np.maximum(nf - 1, 0)
    same_origin = np.allclose(working.affine[:3, 3], fixed.affine[:3, 3], atol=atol, rtol=0)
    if not (same_origin and np.allclose(ends_w, ends_f, atol=atol, rtol=0)):
        raise ValueError(
            "working grid does not span the fixed grid's box of voxel centres; build it with "
            "voxelopt.grid.working_grid(fixed, spacing)"
        )
    if np.any((nw == 1) != (nf == 1)):
        raise ValueError(
            f"working grid {working.shape} and fixed grid {fixed.shape} differ in rank"
        )


def _as_field(disp: Tensor | np.ndarray, working: Volume) -> Tensor:
    """``(3, D, H, W)`` float32 CPU view of a ``(1, 3, ...)`` or ``(3, ...)`` displacement."""
    d = torch.as_tensor(disp)
    if d.dim() == 5 and d.shape[0] == 1:
        d = d[0]
    if d.dim() != 4 or d.shape[0] != 3 or tuple(d.shape[1:]) != working.shape:
        raise ValueError(
            f"disp_working must be (1, 3, {', '.join(map(str, working.shape))}), got "
            f"{tuple(torch.as_tensor(disp).shape)}"
        )
    if not d.is_floating_point():
        raise ValueError(f"disp_working must be floating point, got {d.dtype}")
    return d.detach().to("cpu", torch.float32)


def _ratios(working: Volume, fixed: Volume) -> list[float]:
    """Working voxels per fixed voxel along each axis (0 where the axis has one voxel)."""
    return [
        (w - 1) / (f - 1) if f > 1 else 0.0 for w, f in zip(working.shape, fixed.shape, strict=True)
    ]


def voxel_ratio(working: Volume, fixed: Volume) -> list[float]:
    """Fixed voxels per working voxel along each axis (1 where the axis has one voxel)."""
    return [1.0 / r if r > 0 else 1.0 for r in _ratios(working, fixed)]


class FieldUpsampler:
    """Slabs of a working-grid displacement upsampled to the fixed grid.

    Args:
        disp_working: ``(1, 3, Dw, Hw, Ww)`` (or ``(3, ...)``) displacement in working voxels.
        working: the working grid (corner-aligned with ``fixed``).
        fixed: the fixed grid.
        axis: spatial axis the slabs are cut along.
        plane_axes: the order of the two other axes in a slab (default ascending).
        channels: the displacement channels (spatial axes) slabs hold, in this order.
        matrix: optional ``(4, 4)`` world matrix the field was found through (the fixed world
            point ``p`` samples the moving image at ``matrix @ p``); slabs then hold the total
            displacement against the moving image resampled onto the fixed grid by the
            identity world map, ``u(x) = V x - x + L u_D(x)`` with ``V = G^-1 matrix G`` and
            ``L`` its linear part (``G``: the fixed grid's affine), exactly as
            :func:`voxelopt.affine.compose_affine_and_field`.
    """

    def __init__(
        self,
        disp_working: Tensor,
        working: Volume,
        fixed: Volume,
        axis: int = 0,
        plane_axes: Sequence[int] | None = None,
        channels: Sequence[int] = (0, 1, 2),
        matrix: np.ndarray | None = None,
    ) -> None:
        check_corner_aligned(working, fixed)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        plane = tuple(d for d in range(3) if d != axis) if plane_axes is None else plane_axes
        if sorted((axis, *plane)) != [0, 1, 2]:
            raise ValueError(f"plane_axes must be the two axes other than {axis}, got {plane}")
        if not channels or any(c not in (0, 1, 2) for c in channels):
            raise ValueError(f"channels must be spatial axes 0, 1, 2, got {channels}")
        order = (axis, *plane)
        field = _as_field(disp_working, working)
        self.scale = voxel_ratio(working, fixed)
        self.bound = [float(field[i].abs().max()) * self.scale[i] for i in range(3)]
        factor = torch.tensor(self.scale, dtype=torch.float32).view(3, 1, 1, 1)
        # in fixed voxels, the asked channels, slab axis first (whole contiguous slices)
        field = (field * factor)[list(channels)]
        self.field = field.permute(0, *(1 + d for d in order)).contiguous()
        self.channels = tuple(int(c) for c in channels)
        self.axis, self.order = axis, order
        self.size = tuple(fixed.shape[d] for d in plane)
        self.ratio = _ratios(working, fixed)[axis]
        self.n_working = working.shape[axis]
        self.voxel_matrix = self.field_all = None
        if matrix is not None:  # every channel may be needed: L mixes them
            self.voxel_matrix = np.linalg.solve(fixed.affine, _check_matrix(matrix) @ fixed.affine)
            full = (_as_field(disp_working, working) * factor).permute(0, *(1 + d for d in order))
            self.field_all = full.contiguous()

    def slab(self, start: int, stop: int, channel: int | None = None) -> Tensor:
        """``(C, stop - start, nA, nB)`` float32 slab of the upsampled field.

        Along the slab axis each output slice mixes two working slices: one small matrix
        product of the slices the slab reads (few, large operations: small tensor operations
        pay the thread pool's wake-up on a busy machine); then the plane is interpolated.

        Args:
            start: first fixed index along the slab axis.
            stop: one past the last.
            channel: only this displacement channel (a spatial axis in :attr:`channels`);
                default all of :attr:`channels`, in that order.

        Returns:
            The field in voxels of the fixed grid; axes: channel, slab axis, ``plane_axes``.
        """
        if self.ratio == 1.0 and self.voxel_matrix is None and self.field.shape[2:] == self.size:
            # the working grid is the fixed grid: interpolation weights 1 and 0 change nothing
            field = (
                self.field if channel is None else self.field[self.channels.index(channel), None]
            )
            return field[:, start:stop]
        pos = np.arange(start, stop, dtype=np.float64) * self.ratio
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, max(self.n_working - 2, 0))
        i1 = np.minimum(i0 + 1, self.n_working - 1)
        first, last = int(i0[0]), int(i1[-1])
        weights = np.zeros((stop - start, last - first + 1), dtype=np.float32)
        rows = np.arange(stop - start)
        np.add.at(weights, (rows, i0 - first), (1.0 - (pos - i0)).astype(np.float32))
        np.add.at(weights, (rows, i1 - first), (pos - i0).astype(np.float32))
        wanted = self.channels if channel is None else (channel,)
        if self.voxel_matrix is not None:
            return self._with_affine(start, stop, weights, first, last, wanted)
        field = self.field if channel is None else self.field[self.channels.index(channel), None]
        return self._upsample(field[:, first : last + 1], weights)

    def _upsample(self, part: Tensor, weights: np.ndarray) -> Tensor:
        """``(C, k, nA, nB)`` from the ``(C, m, A, B)`` working slices and ``(k, m)`` weights."""
        c, m = part.shape[:2]
        k = weights.shape[0]
        slab = torch.matmul(torch.from_numpy(weights), part.reshape(c, m, -1))
        slab = slab.view(c, k, *part.shape[2:])
        if tuple(slab.shape[2:]) != self.size:
            slab = F.interpolate(
                slab.reshape(1, c * k, *slab.shape[2:]),
                size=self.size,
                mode="bilinear",
                align_corners=True,
            ).view(c, k, *self.size)
        return slab

    def _with_affine(self, start, stop, weights, first, last, wanted) -> Tensor:
        """Slabs of ``V x - x + L u_D(x)`` for the ``wanted`` channels."""
        v = self.voxel_matrix
        lin = v[:3, :3]
        needed = sorted({j for c in wanted for j in range(3) if lin[c, j] != 0})
        part = torch.stack([self.field_all[j, first : last + 1] for j in needed])
        u = self._upsample(part, weights)  # (len(needed), k, nA, nB)
        coords = [
            torch.arange(start, stop, dtype=torch.float64).view(-1, 1, 1),
            torch.arange(self.size[0], dtype=torch.float64).view(1, -1, 1),
            torch.arange(self.size[1], dtype=torch.float64).view(1, 1, -1),
        ]
        axis_of = dict(zip(self.order, coords, strict=True))  # spatial axis -> its index grid
        out = torch.empty((len(wanted), stop - start, *self.size), dtype=torch.float32)
        for o, c in enumerate(wanted):
            terms = [(float(v[c, j]) - (j == c)) * axis_of[j] for j in range(3)]
            out[o] = (terms[0] + terms[1] + terms[2] + float(v[c, 3])).float()
            for n, j in enumerate(needed):
                if lin[c, j] != 0:
                    out[o].add_(u[n], alpha=float(lin[c, j]))
        return out


def upsample_displacement(
    disp_working: Tensor, working: Volume, fixed: Volume, matrix: np.ndarray | None = None
) -> Tensor:
    """The working-grid displacement on the fixed grid, in voxels of the fixed grid.

    Equal (to float rounding) to ``voxelopt.transform.resize_displacement`` for corner-aligned
    grids, computed slab by slab (its only full-size array is the result: 12 bytes per fixed
    voxel, 786 MB at 512 x 512 x 250).

    Args:
        disp_working: ``(1, 3, Dw, Hw, Ww)`` displacement in working voxels.
        working: the working grid.
        fixed: the fixed grid.
        matrix: the world matrix the field was found through, if any: the result is then
            the total displacement (see :class:`FieldUpsampler`).

    Returns:
        ``(1, 3, D, H, W)`` float32 CPU tensor.
    """
    up = FieldUpsampler(disp_working, working, fixed, axis=0, matrix=matrix)
    out = torch.empty((1, 3, *fixed.shape), dtype=torch.float32)
    size = slab_size(fixed.shape)
    for start in range(0, fixed.shape[0], size):
        stop = min(fixed.shape[0], start + size)
        out[0, :, start:stop] = up.slab(start, stop)
    return out


def warp_to_fixed(
    moving: Volume,
    disp_working: Tensor,
    working: Volume,
    fixed: Volume,
    order: int = 1,
    fill_value: float = 0.0,
    matrix: np.ndarray | None = None,
    dtype: np.dtype | type | None = None,
    on_slab: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Warp ``moving`` onto the full-resolution fixed grid through a working-grid field.

    The fixed voxel ``x`` takes ``moving`` at world point ``matrix @ fixed.affine @ (x + u(x))``
    with ``u`` the upsampled field (voxels of the fixed grid): ``moved(x) = moving(x + u(x))``
    once ``moving`` is on the fixed grid, as in :func:`voxelopt.transform.warp`.

    Args:
        moving: moving image or label map (RAS+, any grid).
        disp_working: ``(1, 3, Dw, Hw, Ww)`` displacement in working voxels.
        working: the working grid (corner-aligned with ``fixed``).
        fixed: the fixed grid (only its shape and affine are used).
        order: 1 = trilinear (images), 0 = nearest (labels).
        fill_value: value outside ``moving`` (see :mod:`voxelopt.sampling`).
        matrix: optional ``(4, 4)`` fixed-world -> moving-world matrix.
        dtype: dtype of the result (default float32 for ``order=1``, else ``moving``'s).
        on_slab: called as ``on_slab(done, total)`` after each slab (progress).

    Returns:
        ``(D, H, W)`` array on the fixed grid.
    """
    job = WarpJob(moving, order, fill_value, dtype)
    return warp_many([job], disp_working, working, fixed, matrix, on_slab)[0]


@dataclass
class WarpJob:
    """A volume for :func:`warp_many`: the moving image or labels, interpolation, fill, dtype."""

    moving: Volume
    order: int = 1
    fill_value: float = 0.0
    dtype: np.dtype | type | None = None


def warp_many(
    jobs: Sequence[WarpJob],
    disp_working: Tensor,
    working: Volume,
    fixed: Volume,
    matrix: np.ndarray | None = None,
    on_slab: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """:func:`warp_to_fixed` for several volumes at once (e.g. image and labels).

    Volumes on the same grid and in the same memory order share the upsampled field and the
    sampling grid of each slab, which are most of the cost.

    Returns:
        One ``(D, H, W)`` array per job, in order.
    """
    world = np.eye(4) if matrix is None else _check_matrix(matrix)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.order not in (0, 1):
            raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {job.order!r}")
        if not isinstance(job.moving, Volume):
            raise TypeError(f"moving must be a voxelopt.io.Volume, got {type(job.moving).__name__}")
        m = job.moving
        key = (m.shape, m.affine.round(6).tobytes(), bool(m.data.flags.f_contiguous))
        groups.setdefault(key, []).append(i)
    results: list = [None] * len(jobs)
    for members in groups.values():
        outs = _warp_group([jobs[i] for i in members], disp_working, working, fixed, world, on_slab)
        for i, out in zip(members, outs, strict=True):
            results[i] = out
    return results


def _warp_group(jobs, disp_working, working, fixed, world, on_slab) -> list[np.ndarray]:
    """Warp volumes that share a grid and memory order, slab by slab."""
    first = jobs[0].moving
    vox = np.linalg.inv(first.affine) @ world @ fixed.affine  # fixed index -> moving index
    step = np.linalg.norm(vox[:3, :3], axis=1)
    layouts, slab_jobs = [], []
    for job in jobs:
        order, data = job.order, job.moving.data
        dtype = job.dtype or (np.float32 if order == 1 else data.dtype)
        layout = SlabLayout(data, vox, fixed.shape, dtype)
        sigma = antialias_sigma(step) if order == 1 else (0.0, 0.0, 0.0)
        exact = order == 1 or fits_float32(data)
        layouts.append(layout)
        slab_jobs.append(
            SlabJob(
                layout.source,
                layout.out_view,
                order,
                job.fill_value,
                tuple(layout.channels(sigma)),
                exact,
            )
        )
    layout = layouts[0]
    view_axes = (2, 1, 0) if layout.transposed else (0, 1, 2)  # fixed axes of the view's axes
    up = FieldUpsampler(disp_working, working, fixed, view_axes[0], view_axes[1:], view_axes)
    n = layout.out_view.shape[0]
    size = slab_size(layout.out_view.shape, first.data.size)
    total = -(-n // size)
    for k, start in enumerate(range(0, n, size)):
        stop = min(n, start + size)
        sample_slabs(
            slab_jobs,
            layout.matrix,
            start,
            stop,
            disp=up.slab(start, stop),
            disp_bound=layout.channels(up.bound),
        )
        if on_slab is not None:
            on_slab(k + 1, total)
    return [lay.out for lay in layouts]
