"""Cost and Levenberg-Marquardt refinement of the affine stage.

The cost of a world matrix ``M`` is the mean squared difference of MIND-SSC descriptors
between the fixed image at its body sample points ``p`` and the moving image at ``M p``,
weighted by how far inside the moving field of view ``M p`` lies (weight 0 outside, 1 from
one voxel inside the border): points the moving scan does not cover carry no signal.

The refinement is compositional Gauss-Newton with Levenberg-Marquardt damping on the update
``M <- M @ Delta(theta)``, ``Delta`` acting about the fixed body centre ``c``:
``Delta(p) = c + (I + B / rho)(p - c) + t`` (affine, 12 parameters) or
``c + exp([w / rho]x)(p - c) + t`` (rigid, 6 parameters), with ``rho`` the points' RMS radius
so that every parameter is in millimetres of motion. Each step needs one sampling of the
moving features and of their derivatives; the normal equations are 12 x 12.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from voxelopt.affine.levels import Level, body_points
from voxelopt.transform import grid_sample_3d

__all__ = ["Problem", "delta_matrix", "refine"]

#: sample points x candidates per grid_sample call in :meth:`Problem.costs`
_BATCH_SAMPLES = 1 << 21
#: Marquardt damping: start, factor on a rejected step, factor on an accepted one
_LAMBDA0, _UP, _DOWN = 1e-3, 4.0, 1.0 / 3.0
#: stop after this many rejected steps in a row (the cost is not smooth below a voxel)
_MAX_REJECTED = 3


def rodrigues(w: np.ndarray) -> np.ndarray:
    """Rotation matrix ``exp([w]x)`` of a rotation vector ``w`` (radians)."""
    angle = float(np.linalg.norm(w))
    k = np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
    if angle < 1e-12:
        return np.eye(3) + k
    k /= angle
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def delta_matrix(theta: np.ndarray, mode: str, centre: np.ndarray, radius: float) -> np.ndarray:
    """The ``(4, 4)`` update ``Delta(theta)`` about ``centre`` (see the module docstring)."""
    if mode == "rigid":
        lin = rodrigues(theta[:3] / radius)
    else:
        lin = np.eye(3) + theta[:9].reshape(3, 3) / radius
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ centre + theta[-3:]
    return out


def _design(r: np.ndarray, mode: str, radius: float) -> np.ndarray:
    """``(N, 3, P)`` derivative of ``Delta(p)`` with respect to ``theta`` at 0, ``r = p - c``."""
    n = len(r)
    if mode == "rigid":
        d = np.zeros((n, 3, 6))
        x, y, z = (r[:, i] / radius for i in range(3))
        d[:, 0, 1], d[:, 0, 2] = z, -y  # -[r]x / rho
        d[:, 1, 0], d[:, 1, 2] = -z, x
        d[:, 2, 0], d[:, 2, 1] = y, -x
    else:
        d = np.zeros((n, 3, 12))
        for i in range(3):
            d[:, i, 3 * i : 3 * i + 3] = r / radius
    d[:, [0, 1, 2], [-3, -2, -1]] = 1.0
    return d


@dataclass
class _Sample:
    values: torch.Tensor  # (K, C, N) moving table at the mapped points
    weights: torch.Tensor  # (K, N) field-of-view weights


class Problem:
    """Fixed sample points and the moving features at one level.

    Args:
        fixed: fixed :class:`Level` (MIND only).
        moving: moving :class:`Level` (MIND and derivatives).
        max_points: at most this many sample points (regular thinning).
        min_overlap: a matrix whose total weight is below this fraction of the points costs
            ``inf``.
    """

    def __init__(self, fixed: Level, moving: Level, max_points: int, min_overlap: float) -> None:
        vox = body_points(fixed, dilate=1, max_points=max_points)
        g = fixed.affine
        self.points = vox @ g[:3, :3].T + g[:3, 3]  # (N, 3) world mm
        idx = torch.from_numpy(vox.astype(np.int64))
        self.fixed = fixed.table[0][:, idx[:, 0], idx[:, 1], idx[:, 2]].float()  # (12, N)
        self.table = moving.table
        self.moving_inv = np.linalg.inv(moving.affine)
        self.size = np.array(moving.shape, dtype=np.float64)
        self.min_overlap = float(min_overlap)
        self._design: dict[str, torch.Tensor] = {}

    def moving_voxels(self, matrices: np.ndarray) -> np.ndarray:
        """``(K, N, 3)`` moving voxel indices of the points under ``(K, 4, 4)`` matrices."""
        v = self.moving_inv[None] @ matrices
        return self.points @ v[:, :3, :3].transpose(0, 2, 1) + v[:, None, :3, 3]

    def sample(self, matrices: np.ndarray, channels: int) -> _Sample:
        q = self.moving_voxels(matrices)
        w = np.clip(np.minimum(q, self.size - 1.0 - q), 0.0, 1.0).prod(axis=-1)
        grid = q[..., ::-1] * (2.0 / np.maximum(self.size[::-1] - 1.0, 1.0)) - 1.0
        grid = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[:, :, None, None]
        table = self.table[:, :channels].expand(len(q), -1, -1, -1, -1)
        vals = grid_sample_3d(table, grid, mode="bilinear", padding_mode="border")
        return _Sample(vals[..., 0, 0], torch.from_numpy(w).float())

    def _cost(self, s: _Sample) -> np.ndarray:
        ssd = ((s.values[:, :12] - self.fixed[None]) ** 2).mean(dim=1)  # (K, N)
        total = s.weights.sum(dim=1)
        cost = (ssd * s.weights).sum(dim=1) / total.clamp(min=1e-9)
        low = total < self.min_overlap * self.points.shape[0]
        return torch.where(low, torch.full_like(cost, float("inf")), cost).double().numpy()

    def costs(self, matrices: np.ndarray) -> np.ndarray:
        """``(K,)`` costs of ``(K, 4, 4)`` world matrices (``inf``: too little overlap)."""
        step = max(1, _BATCH_SAMPLES // len(self.points))
        return np.concatenate(
            [
                self._cost(self.sample(matrices[i : i + step], 12))
                for i in range(0, len(matrices), step)
            ]
        )

    def overlap(self, matrix: np.ndarray) -> float:
        """Fraction of the sample points that ``matrix`` maps inside the moving field of view."""
        return float(self.sample(matrix[None], 12).weights.mean())

    def normal_equations(self, matrix: np.ndarray, s: _Sample, mode: str, centre, radius):
        """Gauss-Newton ``(H, g)`` of the cost at ``matrix`` from its 48-channel sample.

        With ``G_n`` the ``(12, 3)`` derivatives of the sampled descriptors with respect to
        ``Delta(p_n)`` and ``D_n`` the ``(3, P)`` design of :func:`_design`:
        ``H = sum_n w_n D_n^T (G_n^T G_n) D_n`` and ``g = sum_n w_n D_n^T G_n^T r_n``.
        """
        k = torch.from_numpy((self.moving_inv @ matrix)[:3, :3]).float()
        w = s.weights[0]
        vals = s.values[0].T  # (N, 48)
        res = vals[:, :12] - self.fixed.T  # (N, 12)
        grads = vals[:, 12:].reshape(-1, 12, 3) @ k  # (N, 12, 3): d m_c / d Delta(p)
        if mode not in self._design:
            self._design[mode] = torch.from_numpy(_design(self.points - centre, mode, radius))
        d = self._design[mode].float()  # (N, 3, P)
        gtg = grads.transpose(1, 2) @ grads * w[:, None, None]  # (N, 3, 3)
        gtr = (grads.transpose(1, 2) @ res[:, :, None])[..., 0] * w[:, None]  # (N, 3)
        dts = (d.transpose(1, 2) @ gtg).transpose(0, 1).reshape(d.shape[-1], -1)  # (P, 3N)
        h = dts @ d.reshape(-1, d.shape[-1])
        g = d.reshape(-1, d.shape[-1]).T @ gtr.reshape(-1)
        return h.double().numpy(), g.double().numpy()


def refine(problem: Problem, matrix: np.ndarray, mode: str, max_iter: int, tol_mm: float):
    """Levenberg-Marquardt refinement of ``matrix`` on one level.

    Args:
        problem: the level's :class:`Problem`.
        matrix: ``(4, 4)`` starting world matrix.
        mode: ``"rigid"`` or ``"affine"``.
        max_iter: at most this many accepted or rejected steps.
        tol_mm: stop when no parameter moves by more than this (mm of motion).

    Returns:
        ``(matrix, cost, iterations)``.
    """
    centre = problem.points.mean(axis=0)
    radius = float(np.sqrt(((problem.points - centre) ** 2).sum(axis=1).mean()))
    s = problem.sample(matrix[None], 48)
    cost = float(problem._cost(s)[0])
    lam, it, rejected = _LAMBDA0, 0, 0
    h, g = problem.normal_equations(matrix, s, mode, centre, radius)
    while it < max_iter and np.isfinite(cost):
        it += 1
        diag = np.diag(np.maximum(np.diag(h), 1e-12))
        theta = -np.linalg.solve(h + lam * diag, g)
        new = matrix @ delta_matrix(theta, mode, centre, radius)
        s_new = problem.sample(new[None], 48)
        new_cost = float(problem._cost(s_new)[0])
        if new_cost < cost:
            matrix, cost, lam = new, new_cost, max(lam * _DOWN, 1e-7)
            h, g = problem.normal_equations(matrix, s_new, mode, centre, radius)
            rejected = 0
        else:
            lam, rejected = lam * _UP, rejected + 1
        if np.abs(theta).max() < tol_mm or rejected >= _MAX_REJECTED:
            break
    return matrix, cost, it
