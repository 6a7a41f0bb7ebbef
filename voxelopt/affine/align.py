"""``align_affine``: rigid or affine pre-alignment of two CT volumes in world space."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from voxelopt.affine.geometry import affine_displacement, check_matrix
from voxelopt.affine.init import candidate_matrices
from voxelopt.affine.levels import make_level, pool_array, pool_to_spacing
from voxelopt.affine.optimise import Problem, refine

__all__ = ["MODES", "AffineResult", "align_affine"]

MODES = ("rigid", "affine")

#: a matrix whose field-of-view weight is below this fraction of the sample points costs inf
_MIN_WEIGHT = 0.05


@dataclass
class AffineResult:
    """Outcome of :func:`align_affine`.

    Attributes:
        matrix: ``(4, 4)`` world matrix, RAS+ mm: the fixed-space point ``p`` corresponds to
            the moving-space point ``matrix @ p`` (the pull direction of the Learn2Reg
            displacement; the aligned moving image is ``moving(matrix @ p)``).
        mode: ``"rigid"`` or ``"affine"``.
        cost_identity: MIND-SSC cost (mean squared descriptor difference over the fixed body
            points inside the moving field of view; lower is better) of the identity world
            map at the fine level; ``inf`` when the two scans barely overlap in world space
            (under 5 % of the points; ``None`` in :meth:`to_dict`).
        cost_initial: the same cost of the best starting matrix (moments and search).
        cost_final: the same cost of ``matrix``.
        overlap: fraction of the fixed body sample points that ``matrix`` maps inside the
            moving field of view.
        iterations: Levenberg-Marquardt steps, all levels and starts together.
        candidates: starting matrices scored by the search.
        seconds: wall time of the call.
        levels_mm: voxel size of the search and the fine level (mm).
    """

    matrix: np.ndarray
    mode: str
    cost_identity: float
    cost_initial: float
    cost_final: float
    overlap: float
    iterations: int
    candidates: int
    seconds: float
    levels_mm: tuple[float, float] = field(default=(12.0, 6.0))

    def displacement(self, shape, grid_affine, device=None, dtype=torch.float32) -> torch.Tensor:
        """``(1, 3, D, H, W)`` voxel displacement of ``matrix`` on a grid (see
        :func:`voxelopt.affine.affine_displacement`)."""
        return affine_displacement(self.matrix, shape, grid_affine, device, dtype)

    def to_dict(self) -> dict:
        """JSON-ready summary (for report.json)."""
        out = asdict(self)
        out["matrix"] = self.matrix.tolist()
        for key in ("cost_identity", "cost_initial", "cost_final"):
            out[key] = None if not math.isfinite(out[key]) else out[key]
        out["levels_mm"] = list(self.levels_mm)
        return out


def _check_inputs(fixed, moving, mode, spacing_mm, search_spacing_mm):
    from voxelopt.io import Volume

    for name, v in (("fixed", fixed), ("moving", moving)):
        if not isinstance(v, Volume):
            raise TypeError(f"{name} must be a voxelopt.io.Volume, got {type(v).__name__}")
        if min(v.shape) < 2:
            raise ValueError(f"{name} must have at least 2 voxels along every axis, got {v.shape}")
        check_matrix(v.affine, f"{name}.affine")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(spacing_mm, (int, float)) and math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be a positive number, got {spacing_mm!r}")
    if search_spacing_mm is not None and not (
        isinstance(search_spacing_mm, (int, float)) and search_spacing_mm >= spacing_mm
    ):
        raise ValueError(
            f"search_spacing_mm must be a number >= spacing_mm ({spacing_mm}), "
            f"got {search_spacing_mm!r}"
        )


def _pyramid(volume, spacing_mm: float, search_mm: float, moving: bool):
    fine, fine_aff = pool_array(volume.data, volume.affine, spacing_mm)
    coarse, coarse_aff = pool_to_spacing(fine, fine_aff, search_mm)
    return make_level(coarse, coarse_aff, moving), make_level(fine, fine_aff, moving)


def _extent(level) -> float:
    z = (np.argwhere(level.body) @ level.affine[:3, :3].T)[:, 2]
    return float(z.max() - z.min()) if len(z) else 0.0


def _best_start(coarse: Problem, cands, costs, starts: int, max_iter: int):
    """Rigid refinement of the ``starts`` best-scored starts on the coarse level.

    Returns:
        ``(start, refined, iterations)``: the winning start, its refinement, the steps taken.
    """
    best, iterations = None, 0
    for i in np.argsort(costs)[: max(1, int(starts))]:
        m, c, it = refine(coarse, cands[i], "rigid", max_iter, tol_mm=0.1)
        iterations += it
        if best is None or c < best[1]:
            best = (cands[i], c, m)
    return best[0], best[2], iterations


def align_affine(
    fixed,
    moving,
    mode: str = "affine",
    spacing_mm: float = 6.0,
    search_spacing_mm: float | None = None,
    min_overlap_mm: float | None = None,
    max_points: int = 15000,
    search_points: int = 4000,
    max_iter: int = 20,
    starts: int = 3,
) -> AffineResult:
    """Rigid or affine alignment of ``moving`` to ``fixed`` (CT in HU), in world space.

    Both images are area-averaged to about ``search_spacing_mm`` and ``spacing_mm``; starting
    matrices come from the body moments and a search of the shift along the superior axis
    (:func:`voxelopt.affine.init.candidate_matrices`), the ``starts`` best are refined by
    Levenberg-Marquardt on the coarse level (rigid first) and the best is refined on the fine
    level on MIND-SSC (see :mod:`voxelopt.affine.optimise`).

    Args:
        fixed: :class:`voxelopt.io.Volume` in HU.
        moving: :class:`voxelopt.io.Volume` in HU, any grid.
        mode: ``"rigid"`` (6 parameters, proper rotation) or ``"affine"`` (12).
        spacing_mm: voxel size of the fine level (mm).
        search_spacing_mm: voxel size of the search level (default ``2 * spacing_mm``).
        min_overlap_mm: least common extent along the superior axis a start may have
            (default a quarter of the shorter body extent).
        max_points: at most this many fixed sample points per level.
        search_points: at most this many fixed sample points to score the starts.
        max_iter: Levenberg-Marquardt steps per level and start.
        starts: how many of the best starts are refined on the coarse level.

    Returns:
        :class:`AffineResult`.
    """
    _check_inputs(fixed, moving, mode, spacing_mm, search_spacing_mm)
    t0 = time.perf_counter()
    search_mm = float(search_spacing_mm or 2.0 * spacing_mm)
    with torch.no_grad():
        f0, f1 = _pyramid(fixed, spacing_mm, search_mm, moving=False)
        m0, m1 = _pyramid(moving, spacing_mm, search_mm, moving=True)
        if min_overlap_mm is None:
            min_overlap_mm = 0.25 * min(_extent(f0), _extent(m0))
        cands = candidate_matrices(f0, m0, search_mm, float(min_overlap_mm))
        costs = Problem(f0, m0, search_points, _MIN_WEIGHT).costs(cands)
        coarse = Problem(f0, m0, max_points, _MIN_WEIGHT)
        start, matrix, iterations = _best_start(coarse, cands, costs, starts, max_iter)
        if mode == "affine":
            matrix, _, it = refine(coarse, matrix, "affine", max_iter, tol_mm=0.1)
            iterations += it
        fine = Problem(f1, m1, max_points, _MIN_WEIGHT)
        matrix, cost, it = refine(fine, matrix, mode, max_iter, tol_mm=0.01)
        c_id, c_init = fine.costs(np.stack([np.eye(4), start]))
    return AffineResult(
        matrix=matrix,
        mode=mode,
        cost_identity=float(c_id),
        cost_initial=float(c_init),
        cost_final=float(cost),
        overlap=fine.overlap(matrix),
        iterations=iterations + it,
        candidates=len(cands),
        seconds=time.perf_counter() - t0,
        levels_mm=(search_mm, float(spacing_mm)),
    )
