"""One direction of ``bench_intersubject.py``: its scans on the working grid, timing, scoring.

A :class:`Case` holds a direction's full-resolution scans, its working grid (the fixed scan at
about ``spacing`` mm, :func:`voxelopt.grid.working_grid`), what lives on that grid, and our
affine (:func:`voxelopt.affine.align_affine` on the full-resolution files, timed once after a
warm-up call). :func:`score` scores a method's total displacement (voxels of the grid, against
the moving scan placed by the files' headers) with :func:`voxelopt.evaluation.score_registration`
on the organs both scans contain, twice: on the fixed voxels the method itself maps inside the
moving scan ("own" field of view) and on those our affine maps inside it ("common").
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from voxelopt.affine import align_affine, resample_moving
from voxelopt.affine.geometry import affine_displacement
from voxelopt.ct import AIR_HU, BTCV13_LABELS
from voxelopt.evaluation import score_registration
from voxelopt.grid import resample_to_grid, working_grid
from voxelopt.io import Volume, load_labels, load_volume
from voxelopt.paths import shared_dir

#: direction name -> (fixed, moving) folder of ../shared/data
DIRECTIONS = {
    "abdomen<-chest": ("abdomen_ct", "chest_abdomen_ct"),
    "chest<-abdomen": ("chest_abdomen_ct", "abdomen_ct"),
}
#: default working spacing (mm)
WORKING_MM = 3.0


def direction_tag(name: str) -> str:
    """A direction in file names: ``abd_from_chest``, ``chest_from_abd``."""
    return name.replace("<-", "_from_").replace("abdomen", "abd")


@dataclass
class Clock:
    """Wall and process-CPU seconds of a :func:`timed` block."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed() -> Iterator[Clock]:
    """``with timed() as clock:`` fills ``clock`` with the block's wall and CPU seconds."""
    clock = Clock()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield clock
    finally:
        clock.wall, clock.cpu = time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Case:
    """One direction (fixed <- moving): full-resolution inputs, the working grid and what lives
    on it. Arrays ``*_w`` are ``(D, H, W)`` on :attr:`grid` (HU float32, or labels)."""

    name: str
    fixed: Volume
    moving: Volume
    moving_labels: Volume
    grid: Volume
    fixed_w: np.ndarray
    fixed_labels_w: np.ndarray  # organs outside :attr:`organs` set to 0
    moving_own: Volume  # the moving scan on its own grid at the working spacing (ANTs, elastix)
    organs: tuple[int, ...]
    matrix: np.ndarray  # our affine, (4, 4) fixed world -> moving world (RAS+ mm)
    affine_time: Clock  # align_affine's wall / CPU seconds
    moving_affine_w: np.ndarray  # moving on the grid through our affine
    moving_header_w: np.ndarray  # moving on the grid through the headers (identity)
    spacing: float = WORKING_MM  # the working spacing asked for (mm)
    common_inside: np.ndarray | None = None  # (D, H, W) bool: covered under our affine


def _load(name: str) -> tuple[Volume, Volume]:
    folder = shared_dir() / "data" / name
    return load_volume(folder / "ct.nii.gz"), load_labels(folder / "labels_btcv13.nii.gz")


def make_case(name: str, spacing: float = WORKING_MM) -> Case:
    """Load a direction's scans, build its working grid and run our affine once (timed).

    Args:
        name: a key of :data:`DIRECTIONS`.
        spacing: working spacing (mm; never finer than the fixed scan).
    """
    if name not in DIRECTIONS:
        raise ValueError(f"name must be one of {list(DIRECTIONS)}, got {name!r}")
    (fixed, fixed_labels), (moving, moving_labels) = (_load(n) for n in DIRECTIONS[name])
    organs = tuple(
        k
        for k in BTCV13_LABELS
        if (fixed_labels.data == k).any() and (moving_labels.data == k).any()
    )
    grid = working_grid(fixed, spacing)
    fl = np.asarray(resample_to_grid(fixed_labels, grid, 0, 0).data)
    align_affine(fixed, moving, mode="affine")  # warm-up (allocations, first-call costs)
    with timed() as clock:
        matrix = align_affine(fixed, moving, mode="affine").matrix
    case = Case(
        name=name,
        fixed=fixed,
        moving=moving,
        moving_labels=moving_labels,
        grid=grid,
        fixed_w=np.asarray(resample_to_grid(fixed, grid, 1, AIR_HU).data, np.float32),
        fixed_labels_w=np.where(np.isin(fl, organs), fl, 0),
        moving_own=resample_to_grid(moving, working_grid(moving, spacing), 1, AIR_HU),
        organs=organs,
        matrix=matrix,
        affine_time=clock,
        moving_affine_w=resample_to_grid(moving, grid, 1, AIR_HU, matrix).data,
        moving_header_w=resample_to_grid(moving, grid, 1, AIR_HU).data,
        spacing=spacing,
    )
    case.common_inside = covered(case, affine_displacement(matrix, grid.shape, grid.affine))
    return case


def covered(case: Case, total: torch.Tensor) -> np.ndarray:
    """``(D, H, W)`` bool: fixed voxels whose mapped point ``G (x + u(x))`` lies inside the
    moving scan's box of voxel centres (within half a voxel: nearest sampling of ones)."""
    ones = case.moving.with_data(np.ones(case.moving.shape, dtype=np.uint8))
    return resample_moving(case.grid, ones, None, 0, 0, displacement=total).data > 0


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def score(case: Case, total: torch.Tensor, wall: float) -> tuple[dict, tuple]:
    """Scores of a total displacement in its own and in the common field of view.

    Args:
        case: the direction.
        total: ``(1, 3, D, H, W)`` displacement (voxels of the grid) against the moving scan
            placed by the headers.
        wall: the method's runtime (s), stored in the scores.

    Returns:
        ``({"covered": share of fixed organ voxels mapped inside, "own": row, "common": row},
        (moved image on the grid, own field-of-view mask))`` with rows of
        :meth:`voxelopt.evaluation.PairScores.row` (``nan`` as ``None``).
    """
    moved_l = np.asarray(
        resample_moving(case.grid, case.moving_labels, None, 0, 0, displacement=total).data
    )
    moved_l = np.where(np.isin(moved_l, case.organs), moved_l, 0)
    inside = covered(case, total)
    out = {"covered": float(inside[case.fixed_labels_w > 0].mean())}
    for tag, mask in (("own", inside), ("common", case.common_inside)):
        scores = score_registration(
            total,
            spacing=case.grid.spacing,
            fixed_labels=torch.from_numpy(np.where(mask, case.fixed_labels_w, 0)),
            moved_labels=torch.from_numpy(np.where(mask, moved_l, 0)),
            labels=case.organs,
            runtime_s=wall,
        )
        out[tag] = _json_safe(scores.row())
    moved = resample_moving(case.grid, case.moving, None, 1, AIR_HU, displacement=total).data
    return out, (moved, inside)
