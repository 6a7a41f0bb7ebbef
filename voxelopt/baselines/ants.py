"""ANTs SyN (through ``antspyx``) as a registration model.

``antspyx`` is an optional extra (``pip install -e ".[peers]"``) imported only when the
adapter runs. Both images are windowed, placed in ITK physical space with the fixed image's
affine (:mod:`voxelopt.baselines.itk_space`), registered with ``ants.registration``, and the
forward transforms are composed by ANTs into one physical deformation field on the fixed grid,
which is turned into our displacement (voxels of the fixed grid, ``moved(x) = moving(x + u)``).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import numpy as np
from torch import Tensor

from voxelopt.baselines.itk_space import (
    INSTALL_HINT,
    ArrayPeer,
    ItkGeometry,
    check_affine,
    peer_available,
    physical_to_voxel_displacement,
)
from voxelopt.ct import HU_WINDOW

__all__ = ["AntsSyN", "ants_available"]


def _import_ants():
    try:
        import ants
    except ImportError as exc:
        raise ImportError(f"ANTs SyN needs the antspyx package ({exc}): {INSTALL_HINT}") from None
    return ants


def ants_available() -> tuple[bool, str]:
    """Whether ``antspyx`` imports; the reason when it does not."""
    return peer_available(_import_ants)


@contextmanager
def _itk_threads(threads: int | None):
    """Temporarily set ITK's default thread count (read by ANTs when it starts a run)."""
    key = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
    old = os.environ.get(key)
    if threads is not None:
        os.environ[key] = str(threads)
    try:
        yield
    finally:
        if threads is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class AntsSyN(ArrayPeer):
    """ANTs symmetric normalisation as a registration model (CPU, no gradients).

    Args:
        affine: ``(4, 4)`` voxel -> RAS+ mm matrix of the fixed grid (the moving image lies on
            the same grid); ``None`` means 1 mm voxels. SyN's parameters are in mm, so pass
            the real affine.
        type_of_transform: ``ants.registration`` transform (``"SyN"``: affine + SyN;
            ``"SyNOnly"``: deformable only; ``"SyNRA"``, ...).
        threads: ITK threads for the run (``None``: ANTs' default).
        window_low: CT window lower bound (HU); images are windowed to ``[0, 1]`` first.
        window_high: CT window upper bound (HU).
        **registration_kwargs: passed to ``ants.registration`` (e.g. ``reg_iterations``,
            ``syn_metric``, ``grad_step``, ``flow_sigma``).
    """

    def __init__(
        self,
        affine=None,
        type_of_transform: str = "SyN",
        threads: int | None = None,
        window_low: float = HU_WINDOW[0],
        window_high: float = HU_WINDOW[1],
        **registration_kwargs,
    ) -> None:
        super().__init__()
        self.geometry = ItkGeometry.from_affine(check_affine(affine))
        if not isinstance(type_of_transform, str) or not type_of_transform:
            raise ValueError(
                f"type_of_transform must be a non-empty string, got {type_of_transform!r}"
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        self.type_of_transform = type_of_transform
        self.threads = threads
        self.window = (float(window_low), float(window_high))
        self.registration_kwargs = dict(registration_kwargs)

    def _image(self, ants, array: np.ndarray, geometry: ItkGeometry | None = None):
        g = self.geometry if geometry is None else geometry
        return ants.from_numpy(
            np.ascontiguousarray(array, dtype=np.float32),
            origin=tuple(float(v) for v in g.origin),
            spacing=tuple(float(v) for v in g.spacing),
            direction=g.direction.copy(),
        )

    def register_arrays(
        self, fixed: np.ndarray, moving: np.ndarray, moving_affine=None, matrix=None
    ) -> Tensor:
        """:meth:`ArrayPeer.register_arrays`; with a start ``matrix`` ANTs starts from the
        identity there instead of its centre-of-mass initialisation (unless
        ``initial_transform`` was given)."""
        ants = _import_ants()
        placed = self.moving_geometry(moving_affine, matrix)
        fixed_img, moving_img = self._image(ants, fixed), self._image(ants, moving, placed)
        kwargs = dict(self.registration_kwargs)
        if matrix is not None:
            kwargs.setdefault("initial_transform", ["Identity"])
        with (
            tempfile.TemporaryDirectory(prefix="voxelopt_ants_") as tmp,
            _itk_threads(self.threads),
        ):
            result = ants.registration(
                fixed_img,
                moving_img,
                type_of_transform=self.type_of_transform,
                outprefix=os.path.join(tmp, "reg_"),
                **kwargs,
            )
            field_path = ants.apply_transforms(
                fixed_img,
                moving_img,
                result["fwdtransforms"],
                compose=os.path.join(tmp, "field_"),
            )
            field = ants.image_read(field_path).numpy()
        return self.with_start(physical_to_voxel_displacement(field, self.geometry), matrix)
