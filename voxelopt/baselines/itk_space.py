"""Our RAS+ voxel arrays <-> ITK physical space (LPS), for the ANTs and elastix adapters.

Our volumes are ``(D, H, W)`` arrays with a voxel -> world affine ``A`` in RAS+ millimetres.
ITK (hence ANTs and elastix) places images in LPS: ``p_LPS = diag(-1, -1, 1) p_RAS``. An ITK
image whose index ``(i, j, k)`` is our voxel ``(i, j, k)`` therefore has

* origin ``= F A[:3, 3]``, spacing ``s_c = ||L[:, c]||``, direction ``= L / s`` (columns),

with ``F = diag(-1, -1, 1)`` and ``L = F A[:3, :3]``. A registration of ITK images returns a
transform ``T`` from fixed to moving physical points (ITK resamples ``moving(T(p))``), i.e. our
convention once expressed in voxels: ``u(x) = L^{-1} (T(p(x)) - p(x))`` where ``T(p) - p`` is
the physical (LPS) displacement ITK writes as a deformation field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from voxelopt.features.base import check_image_pair
from voxelopt.features.intensity import window

__all__ = ["ItkGeometry", "check_affine", "physical_to_voxel_displacement"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def check_affine(affine, name: str = "affine") -> np.ndarray:
    """Validate a ``(4, 4)`` voxel -> RAS+ mm matrix (``None`` means 1 mm, origin 0).

    Returns:
        ``(4, 4)`` float64 array.
    """
    if affine is None:
        return np.eye(4)
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"{name} must be a (4, 4) voxel-to-world matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name} must be finite and invertible, got {a.tolist()}")
    return a


@dataclass(frozen=True)
class ItkGeometry:
    """ITK geometry (LPS) of an array indexed like ours.

    Attributes:
        origin: physical position (mm, LPS) of voxel ``(0, 0, 0)``.
        spacing: voxel size (mm) along index axes 0, 1, 2.
        direction: ``(3, 3)`` matrix whose column ``c`` is the unit LPS direction of axis ``c``.
        linear: ``(3, 3)`` ``direction @ diag(spacing)``, voxel steps -> LPS mm.
    """

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    linear: np.ndarray

    @classmethod
    def from_affine(cls, affine) -> ItkGeometry:
        """Geometry of a RAS+ voxel -> world ``(4, 4)`` matrix (``None``: 1 mm, origin 0)."""
        a = check_affine(affine)
        linear = RAS_TO_LPS @ a[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        return cls(
            origin=RAS_TO_LPS @ a[:3, 3],
            spacing=spacing,
            direction=linear / spacing,
            linear=linear,
        )

    def ras_affine(self) -> np.ndarray:
        """The ``(4, 4)`` voxel -> RAS+ mm matrix (inverse of :meth:`from_affine`)."""
        a = np.eye(4)
        a[:3, :3], a[:3, 3] = RAS_TO_LPS @ self.linear, RAS_TO_LPS @ self.origin
        return a

    def voxel_to_physical(self, index: np.ndarray) -> np.ndarray:
        """``(..., 3)`` voxel indices -> ``(..., 3)`` LPS points (mm)."""
        return np.asarray(index, dtype=np.float64) @ self.linear.T + self.origin


def physical_to_voxel_displacement(disp_lps: np.ndarray, geometry: ItkGeometry) -> Tensor:
    """Turn an ITK deformation field into our displacement.

    Args:
        disp_lps: ``(D, H, W, 3)`` physical displacement ``T(p) - p`` (mm, LPS components) at
            every voxel of the fixed grid, indexed like our arrays.
        geometry: the fixed image's :class:`ItkGeometry`.

    Returns:
        ``(1, 3, D, H, W)`` float32 displacement in voxels of the fixed grid,
        ``moved(x) = moving(x + u(x))``.
    """
    d = np.asarray(disp_lps, dtype=np.float64)
    if d.ndim != 4 or d.shape[-1] != 3:
        raise ValueError(f"disp_lps must be (D, H, W, 3), got shape {d.shape}")
    vox = d @ np.linalg.inv(geometry.linear).T
    return torch.from_numpy(np.ascontiguousarray(vox.transpose(3, 0, 1, 2))).float()[None]


#: how to get the optional peers
INSTALL_HINT = 'pip install -e ".[peers]" (in the voxelopt folder)'


def peer_available(importer) -> tuple[bool, str]:
    """Whether a peer's lazy ``importer()`` succeeds; the reason (its ImportError) when not."""
    try:
        importer()
    except ImportError as exc:
        return False, str(exc)
    return True, ""


class ArrayPeer(nn.Module):
    """Base of the adapters that register one pair of numpy volumes at a time (ANTs, elastix).

    Subclasses set ``self.window`` (HU) and ``self.geometry`` (the fixed grid's) and implement
    :meth:`register_arrays` on windowed arrays (the moving one on the fixed grid or on its own,
    optionally placed through a start matrix), returning a ``(1, 3, D, H, W)`` displacement in
    voxels of the fixed grid.
    """

    window: tuple[float, float]
    geometry: ItkGeometry

    def register_arrays(
        self, fixed: np.ndarray, moving: np.ndarray, moving_affine=None, matrix=None
    ) -> Tensor:
        """Register two arrays (already windowed), the moving one on the fixed grid or its own.

        Args:
            fixed: ``(D, H, W)`` on the fixed grid.
            moving: ``(D', H', W')``: on the fixed grid, or on ``moving_affine``'s grid.
            moving_affine: ``(4, 4)`` voxel -> RAS+ mm matrix of ``moving`` (default: the
                fixed grid's).
            matrix: optional ``(4, 4)`` start (fixed world -> moving world, RAS+ mm, e.g.
                :func:`voxelopt.affine.align_affine`'s): the moving image is placed through it
                (:meth:`moving_geometry`).

        Returns:
            ``(1, 3, D, H, W)`` float32 displacement in voxels of the fixed grid against the
            moving image placed by ``moving_affine`` (with ``matrix``: the total, start
            included, :meth:`with_start`).
        """
        raise NotImplementedError

    def moving_geometry(self, moving_affine=None, matrix=None) -> ItkGeometry:
        """Where the moving array lies: on its own grid ``moving_affine`` (default: the fixed
        grid), moved into the fixed world by a start ``matrix`` (fixed world -> moving world,
        RAS+ mm): voxel ``v`` at ``matrix^-1 @ moving_affine @ v``."""
        if moving_affine is None and matrix is None:
            return self.geometry
        placed = self.geometry.ras_affine() if moving_affine is None else moving_affine
        placed = check_affine(placed, "moving_affine")
        if matrix is not None:
            placed = np.linalg.solve(check_affine(matrix, "matrix"), placed)
        return ItkGeometry.from_affine(placed)

    def with_start(self, displacement: Tensor, matrix=None) -> Tensor:
        """The total displacement against the moving image placed by its own grid: the field
        found after the start ``matrix`` composed with it
        (:func:`voxelopt.affine.compose_affine_and_field`); unchanged without one."""
        if matrix is None:
            return displacement
        from voxelopt.affine import compose_affine_and_field

        return compose_affine_and_field(matrix, displacement, self.geometry.ras_affine())

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        """Register ``moving_hu`` to ``fixed_hu`` (each batch element separately).

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` Hounsfield units.
            moving_hu: ``(B, 1, D, H, W)`` Hounsfield units on the same grid.

        Returns:
            ``(B, 3, D, H, W)`` displacement in voxels of the fixed grid, on the input's
            device and dtype.
        """
        fixed_hu, moving_hu = check_image_pair(fixed_hu, moving_hu)
        fixed = window(fixed_hu.detach(), *self.window).cpu().double().numpy()
        moving = window(moving_hu.detach(), *self.window).cpu().double().numpy()
        out = [self.register_arrays(f[0], m[0]) for f, m in zip(fixed, moving, strict=True)]
        return torch.cat(out).to(device=fixed_hu.device, dtype=fixed_hu.dtype)
