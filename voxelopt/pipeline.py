"""Registration of two volumes as they come from files: working grid in, full resolution out.

:func:`register_volumes` is what the command line (and any caller holding
:class:`~voxelopt.io.Volume` objects) runs:

1. ``resample``: the working grid (:func:`voxelopt.grid.working_grid`, spacing from
   :func:`voxelopt.grid.working_spacing`) is built on the fixed image's box; both images are
   brought onto it through world coordinates (anti-aliased where shrinking; the moving image
   through the optional world ``matrix`` of an affine pre-alignment), label maps by nearest
   neighbour. Nothing after this step sees the file grids.
2. ``features`` and ``solve`` on the working grid (features, cost volumes and entropy of a
   clinical scan never exist at its full resolution).
3. ``metrics`` on the working grid (:func:`voxelopt.evaluation.score_registration`);
   :attr:`VolumeRegistration.metrics_grid` says so.
4. ``warp``: the moving image and labels warped at full resolution onto the fixed grid, slab by
   slab, through the upsampled field (:func:`voxelopt.fullres.warp_to_fixed`).

The full-resolution displacement (Learn2Reg layout) is never held: it is computed on demand
(:meth:`VolumeRegistration.displacement`) or streamed into a file
(:meth:`VolumeRegistration.write_displacement`).

Progress protocol: ``progress(stage, event, info)`` with ``stage`` one of :data:`STAGES`,
``event`` ``"start"`` (``info``: what the stage works on, e.g. ``{"shape": ..., "total": n}``
when it has ``n`` steps), ``"step"`` (``info``: ``{"done": k, "total": n}`` plus details such
as ``"level"``), or ``"end"`` (``info``: ``{"seconds": s}``). A stage that raises sends no
``"end"``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from voxelopt.ct import AIR_HU
from voxelopt.fov import common_view, masks_on_grid
from voxelopt.fullres import WarpJob, upsample_displacement, warp_many, warp_to_fixed
from voxelopt.grid import (
    DEFAULT_VOXEL_BUDGET,
    grid_of,
    resample_to_grid,
    working_grid,
    working_spacing,
)
from voxelopt.io import Volume, check_same_grid

__all__ = [
    "STAGES",
    "ProgressCallback",
    "VolumeRegistration",
    "compact_label_dtype",
    "register_volumes",
    "volume_from_array",
]

#: Stages of :func:`register_volumes`, in order (``load`` and ``write`` belong to the caller).
STAGES = ("resample", "features", "solve", "metrics", "warp")


class ProgressCallback(Protocol):
    """``progress(stage, event, info)``: see the module docstring."""

    def __call__(self, stage: str, event: str, info: dict) -> None: ...


@dataclass
class VolumeRegistration:
    """What :func:`register_volumes` returns.

    Attributes:
        fixed_grid: the fixed image's grid (``data`` a zero-stride view; shape, affine, file
            orientation).
        working_grid: the grid the solver ran on (same world box, see
            :func:`voxelopt.grid.working_grid`).
        displacement_working: ``(1, 3, Dw, Hw, Ww)`` float32 in working voxels,
            ``moved_w(x) = moving_w(x + u(x))``.
        moved: ``(D, H, W)`` float32 moving image warped onto the full-resolution fixed grid.
        moved_labels: ``(D, H, W)`` warped moving labels (nearest; the smallest integer dtype
            holding them, see :func:`compact_label_dtype`), when given.
        entropy: ``(Dw, Hw, Ww)`` displacement entropy of the finest level (working grid).
        scores: :class:`~voxelopt.evaluation.PairScores` computed on the working grid.
        metrics_grid: on which grid the scores were computed: ``{"grid": "working", "shape",
            "spacing_mm"}``.
        timings: seconds per stage (:data:`STAGES`); callers add ``load`` and ``write``.
        runtime_s: features plus solve, seconds.
        matrix: the world matrix the moving image was sampled through, if any.
        coverage: share of the working grid where each image has data (``"fixed"``,
            ``"moving"``: its field of view and mask, see :mod:`voxelopt.fov`).
    """

    fixed_grid: Volume
    working_grid: Volume
    displacement_working: Tensor
    moved: np.ndarray
    moved_labels: np.ndarray | None
    entropy: np.ndarray
    scores: object
    metrics_grid: dict
    timings: dict[str, float] = field(default_factory=dict)
    runtime_s: float = 0.0
    matrix: np.ndarray | None = None
    coverage: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        """JSON-safe scores (``scores.to_json()``)."""
        return self.scores.to_json()

    def displacement(self) -> Tensor:
        """``(1, 3, D, H, W)`` float32 field in voxels of the fixed grid (12 bytes a voxel).

        With a :attr:`matrix`, the total displacement (affine and deformable) against the
        moving image resampled onto the fixed grid by the identity world map.
        """
        return upsample_displacement(
            self.displacement_working, self.working_grid, self.fixed_grid, self.matrix
        )

    def write_displacement(self, path: str | Path, grid: str = "fixed", **kw) -> Path:
        """Write the field as NIfTI ``(X, Y, Z, 3)`` in voxels of the chosen grid, file axes.

        With a :attr:`matrix`, the total displacement, as :meth:`displacement`.

        Args:
            path: ``.nii.gz`` or ``.nii`` destination (written atomically).
            grid: ``"fixed"`` (the Learn2Reg convention: the fixed file's grid, streamed slab
                by slab) or ``"working"`` (the solver's grid; its affine is in the file).
            **kw: ``threads``, ``level``, ``huffman_only`` of
                :func:`voxelopt.nifti_stream.write_nifti_slabs`.
        """
        from voxelopt.nifti_stream import write_displacement

        if grid not in ("fixed", "working"):
            raise ValueError(f"grid must be 'fixed' or 'working', got {grid!r}")
        target = self.fixed_grid if grid == "fixed" else self.working_grid
        return write_displacement(
            self.displacement_working, self.working_grid, target, path, self.matrix, **kw
        )


def volume_from_array(array, spacing: float | Sequence[float] = 1.0) -> Volume:
    """A ``(D, H, W)`` array (RAS+ axes) as a :class:`~voxelopt.io.Volume` with ``spacing`` mm.

    For callers holding arrays rather than files (e.g. :func:`voxelopt.register`): the
    affine is ``diag(spacing)`` with the origin at voxel 0.
    """
    from voxelopt.checks import check_spacing

    data = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    if data.ndim != 3:
        raise ValueError(f"array must be (D, H, W), got shape {data.shape}")
    affine = np.diag([*check_spacing(spacing), 1.0])
    return Volume(data, affine, np.array([[0, 1], [1, 1], [2, 1]]))


def compact_label_dtype(labels: np.ndarray) -> np.dtype:
    """The smallest of uint8, int16, int32, int64 that holds every value of ``labels``."""
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class _Stages:
    """Times stages and forwards start/step/end events to an optional callback."""

    def __init__(self, progress: ProgressCallback | None, device: torch.device) -> None:
        self.progress, self.device, self.timings = progress, device, {}

    def emit(self, stage: str, event: str, info: dict) -> None:
        if self.progress is not None:
            self.progress(stage, event, info)

    @contextmanager
    def __call__(self, stage: str, **info) -> Iterator[Callable[..., None]]:
        self.emit(stage, "start", info)
        start = time.perf_counter()

        def step(done: int, total: int, **extra) -> None:
            self.emit(stage, "step", {"done": done, "total": total, **extra})

        yield step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.emit(stage, "end", {"seconds": seconds})


def _check_inputs(fixed, moving, fixed_labels, moving_labels, masks=(None, None)) -> None:
    for name, v in (("fixed", fixed), ("moving", moving)):
        if not isinstance(v, Volume):
            raise TypeError(f"{name} must be a voxelopt.io.Volume, got {type(v).__name__}")
    if (fixed_labels is None) != (moving_labels is None):
        given = "fixed_labels" if fixed_labels is not None else "moving_labels"
        raise ValueError(f"{given} was given without the other label map; give both or neither")
    if fixed_labels is not None:
        check_same_grid(fixed_labels, fixed, ("fixed_labels", "fixed"))
        check_same_grid(moving_labels, moving, ("moving_labels", "moving"))
    named = zip(("fixed_mask", "moving_mask"), masks, (fixed, moving), strict=True)
    for name, mask, image in named:
        if mask is not None:
            if not isinstance(mask, Volume):
                raise TypeError(f"{name} must be a voxelopt.io.Volume, got {type(mask).__name__}")
            check_same_grid(mask, image, (name, name.split("_")[0]))
            if not np.any(mask.data):
                raise ValueError(f"{name} is empty: it has no nonzero voxel")


def _tensor(data: np.ndarray, device: torch.device, dtype=torch.float32) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(data)).to(device, dtype)[None, None]


def _resample(fixed, moving, fixed_labels, grid, matrix, fill, stages, field_of_view):
    """Both images and the fixed labels on the working grid (moving through ``matrix``).

    Returns ``(images, fixed_labels, coverage)``: ``[fixed, moving]`` on the grid, the fixed
    label map on it (nearest; ``None`` without labels), and the images' ``[fixed, moving]``
    coverage maps (:func:`voxelopt.fov.sample_with_coverage`; ``None`` where an image covers
    the grid, and always without ``field_of_view``).
    """
    from voxelopt.fov import sample_with_coverage

    total = 2 + (fixed_labels is not None)
    images, covered = [], [None, None]
    with stages("resample", shape=grid.shape, spacing_mm=grid.spacing, total=total) as step:
        for i, (volume, m) in enumerate(((fixed, None), (moving, matrix))):
            if field_of_view:
                volume, covered[i] = sample_with_coverage(volume, grid, m, fill)
            else:
                volume = resample_to_grid(volume, grid, 1, fill, m)
            images.append(volume)
            step(i + 1, total)
        if fixed_labels is not None:
            fixed_labels = resample_to_grid(fixed_labels, grid, 0, 0)
            step(total, total)
    return images, fixed_labels, covered


def _solve(model, f: Tensor, m: Tensor, masks: Sequence[Tensor | None], stages: _Stages):
    """Features, then the pyramid (per-level steps when the solver reports them)."""
    shape = tuple(f.shape[2:])
    with stages("features", shape=shape, extractor=type(model.extractor).__name__):
        feats = model.features(f, m)
    levels = model.config.levels
    with stages("solve", shape=shape, total=levels) as step:
        solve = model.solver.solve
        hook = {}
        if "on_level" in inspect.signature(solve).parameters:
            hook["on_level"] = lambda done, n: step(done, n, level=n - done)  # (finished, L)
        if any(mask is not None for mask in masks):
            hook.update(model.solver_masks(*masks, feats[0].shape[2:]))
        result = solve(*feats, **hook)
    return result


def _solve_and_score(model, images: list, masks: list, labels: tuple, grid, matrix, device, stages):
    """Features, solve and scores on the working grid: ``(disp (CPU), entropy, scores, s)``.

    ``images`` holds ``[fixed, moving]`` on the grid (emptied once solved), ``masks`` their
    masks (or ``None``), ``labels`` the fixed label map on the grid and the moving label
    map on its own grid (or ``(None, None)``). The moving labels are sampled once, through
    the whole map (``matrix`` and field), never resampled twice by nearest neighbour.
    """
    from voxelopt.evaluation import score_registration

    with torch.inference_mode():
        f, m = (_tensor(v.data, device) for v in images)
        mask_tensors = [None if x is None else _tensor(x, device) for x in masks]
        result = _solve(model, f, m, mask_tensors, stages)
        disp = result.displacement.float()
        entropy = result.entropy[0, 0].float().cpu().numpy()
        del f, m, result, mask_tensors  # the levels' maps: 190 bytes per working voxel
        images.clear()
        runtime = stages.timings["features"] + stages.timings["solve"]
        with stages("metrics", grid="working", shape=grid.shape):
            fl = moved = None
            if labels[0] is not None:
                fl = _tensor(labels[0].data, device, torch.int64)[0, 0]
                moved = warp_to_fixed(labels[1], disp.cpu(), grid, grid, 0, 0, matrix)
                moved = _tensor(moved, device, torch.int64)[0, 0]
            scores = score_registration(
                disp, spacing=grid.spacing, fixed_labels=fl, moved_labels=moved, runtime_s=runtime
            )
    return disp.cpu(), entropy, scores, runtime


def register_volumes(
    fixed: Volume,
    moving: Volume,
    *,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    extractor="mind",
    config=None,
    spacing: str | float = "auto",
    budget_voxels: int = DEFAULT_VOXEL_BUDGET,
    matrix: np.ndarray | None = None,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    field_of_view: bool = True,
    device: str | torch.device = "cpu",
    fill_value: float = AIR_HU,
    progress: ProgressCallback | None = None,
    memory_check: bool = False,
    model=None,
) -> VolumeRegistration:
    """Register two CT volumes on a working grid; moved image and labels at full resolution.

    Args:
        fixed: fixed CT in HU (RAS+ :class:`~voxelopt.io.Volume`, any grid).
        moving: moving CT in HU (any grid; sampled through world coordinates).
        fixed_labels: label map on ``fixed``'s grid (with ``moving_labels``, or neither).
        moving_labels: label map on ``moving``'s grid.
        extractor: feature extractor or registry name (``"mind"`` by default).
        config: :class:`~voxelopt.VoxelOptConfig` (default: the reference's).
        spacing: ``"auto"`` or the working spacing in mm (see
            :func:`voxelopt.grid.working_spacing`).
        budget_voxels: the voxel budget of ``"auto"``.
        matrix: optional ``(4, 4)`` world matrix: the fixed world point ``p`` samples the
            moving image at ``matrix @ p`` (affine pre-alignment).
        device: where features and solver run (``"cpu"`` or ``"cuda"``).
        fill_value: image value outside the moving image (HU; air).
        progress: optional :class:`ProgressCallback`.
        memory_check: first compare the memory the remaining stages need
            (:func:`voxelopt.memory.estimate_peak_bytes`, less the inputs already loaded) with
            what is available, and stop with a one-line ``ValueError`` naming a ``spacing``
            that fits.
        model: a :class:`~voxelopt.VoxelOptRegistration` to run instead of one built from
            ``extractor`` and ``config`` (e.g. with ``cache_fixed``, so that the features of a
            fixed image registered to several moving images are computed once).

    Returns:
        :class:`VolumeRegistration`.
    """
    from voxelopt.registration import VoxelOptRegistration

    _check_inputs(fixed, moving, fixed_labels, moving_labels, (fixed_mask, moving_mask))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    if model is None:
        model = VoxelOptRegistration(extractor, config)
    model = model.to(device).eval()
    stages = _Stages(progress, device)
    grid = working_grid(fixed, working_spacing(fixed.shape, fixed.spacing, spacing, budget_voxels))
    labels = fixed_labels is not None
    if memory_check:
        from voxelopt.memory import check_volumes_memory

        check_volumes_memory(fixed, moving, grid, model, labels)
    images, fixed_labels_grid, covered = _resample(
        fixed, moving, fixed_labels, grid, matrix, fill_value, stages, field_of_view
    )
    masks = masks_on_grid(covered, (fixed_mask, moving_mask), grid, matrix)
    images = common_view(images, covered, fill_value)
    disp, entropy, scores, runtime = _solve_and_score(
        model, images, masks, (fixed_labels_grid, moving_labels), grid, matrix, device, stages
    )
    with stages("warp", shape=fixed.shape) as step:
        jobs = [WarpJob(moving, 1, fill_value)]
        if labels:
            jobs.append(WarpJob(moving_labels, 0, 0, compact_label_dtype(moving_labels.data)))
        moved, *rest = warp_many(jobs, disp, grid, fixed, matrix, on_slab=step)
        moved_labels = rest[0] if labels else None
    return VolumeRegistration(
        fixed_grid=grid_of(fixed),
        working_grid=grid,
        displacement_working=disp,
        moved=moved,
        moved_labels=moved_labels,
        entropy=entropy,
        scores=scores,
        metrics_grid={
            "grid": "working",
            "shape": list(grid.shape),
            "spacing_mm": list(grid.spacing),
        },
        timings=dict(stages.timings),
        runtime_s=runtime,
        matrix=None if matrix is None else np.asarray(matrix, dtype=np.float64),
        coverage={
            name: 1.0 if mask is None else float(mask.mean())
            for name, mask in zip(("fixed", "moving"), masks, strict=True)
        },
    )
