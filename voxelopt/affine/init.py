"""Starting matrices of the affine stage, from the images themselves.

* Body moments: centre of mass and principal axes of each body mask (above ``BODY_HU``).
  The rotation candidates are the identity (the scanners' patient coordinates already agree
  in orientation) and the four proper rotations ``R = V_m diag(s) V_f^T`` that take the fixed
  principal axes onto the moving ones (``s`` a sign pattern with ``det R = +1``): the axes'
  signs are ambiguous, the similarity decides.
* Fields of view that differ along the body axis (chest vs abdomen-pelvis) bias the centres
  of mass, so the translation along the world superior axis is searched: for every shift
  that leaves at least ``min_overlap_mm`` of common extent, the in-plane translation aligns
  the body centres *of the overlapping slab only*, and every candidate is scored with the
  similarity at the coarsest level.
"""

from __future__ import annotations

import itertools

import numpy as np

from voxelopt.affine.levels import Level

__all__ = ["body_moments", "candidate_matrices", "rotation_candidates"]


def _world_points(level: Level) -> np.ndarray:
    vox = np.argwhere(level.body).astype(np.float64)
    return vox @ level.affine[:3, :3].T + level.affine[:3, 3]


def body_moments(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``(3,)`` and principal axes ``(3, 3)`` (columns, by decreasing variance)."""
    centre = points.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov((points - centre).T))
    return centre, evecs[:, np.argsort(evals)[::-1]]


def rotation_candidates(axes_fixed: np.ndarray, axes_moving: np.ndarray) -> list[np.ndarray]:
    """The identity and the proper rotations taking the fixed principal axes onto the moving."""
    out = [np.eye(3)]
    for signs in itertools.product((1.0, -1.0), repeat=3):
        r = axes_moving @ np.diag(signs) @ axes_fixed.T
        if np.linalg.det(r) > 0 and not any(np.allclose(r, o, atol=1e-6) for o in out):
            out.append(r)
    return out


def _slab_sums(z: np.ndarray, xy: np.ndarray):
    order = np.argsort(z)
    zs = z[order]
    csum = np.concatenate([np.zeros((1, 2)), np.cumsum(xy[order], axis=0)])
    return zs, csum


def _slab_centres(zs, csum, low, high):
    """In-plane centres ``(K, 2)`` and counts ``(K,)`` of the points with ``low <= z <= high``."""
    a = np.searchsorted(zs, low, side="left")
    b = np.searchsorted(zs, high, side="right")
    count = (b - a).astype(np.float64)
    return (csum[b] - csum[a]) / np.maximum(count, 1.0)[:, None], count


def _translations(fixed_pts, moved_pts, step_mm: float, min_overlap_mm: float) -> np.ndarray:
    """``(K, 3)`` fixed-frame translations ``t'`` (moving point ``q'`` matches ``q' - t'``)."""
    fz, mz = fixed_pts[:, 2], moved_pts[:, 2]
    lo = mz.min() - fz.max() + min_overlap_mm
    hi = mz.max() - fz.min() - min_overlap_mm
    if hi < lo:  # the shorter extent is below the overlap asked for: align the centres
        tz = np.array([mz.mean() - fz.mean()])
    else:
        tz = np.arange(lo, hi + 1e-9, step_mm)
    low = np.maximum(fz.min(), mz.min() - tz)
    high = np.minimum(fz.max(), mz.max() - tz)
    cf, nf = _slab_centres(*_slab_sums(fz, fixed_pts[:, :2]), low, high)
    cm, nm = _slab_centres(*_slab_sums(mz, moved_pts[:, :2]), low + tz, high + tz)
    keep = (nf > 0) & (nm > 0)
    return np.column_stack([cm - cf, tz])[keep]


def candidate_matrices(
    fixed: Level, moving: Level, step_mm: float, min_overlap_mm: float
) -> np.ndarray:
    """Starting world matrices ``(K, 4, 4)``: rotation candidates x translation search.

    Each matrix is ``q = R (p + t' - c_f) + c_m``: the body centres ``c_f``, ``c_m`` put
    together, the rotation ``R`` about them, then the fixed-frame shift ``t'``.

    Args:
        fixed: coarsest fixed :class:`Level`.
        moving: coarsest moving :class:`Level`.
        step_mm: spacing of the shifts along the superior axis (mm).
        min_overlap_mm: least common extent along that axis (mm).
    """
    pf, pm = _world_points(fixed), _world_points(moving)
    if len(pf) == 0 or len(pm) == 0:
        raise ValueError("an image holds no voxel above the body threshold: nothing to align")
    cf, axes_f = body_moments(pf)
    cm, axes_m = body_moments(pm)
    out = []
    for r in rotation_candidates(axes_f, axes_m):
        moved = (pm - cm) @ r + cf  # R^T (q - c_m) + c_f, row vectors
        for t in _translations(pf, moved, step_mm, min_overlap_mm):
            m = np.eye(4)
            m[:3, :3] = r
            m[:3, 3] = cm + r @ (t - cf)
            out.append(m)
    return np.stack(out)
