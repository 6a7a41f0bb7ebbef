"""elastix B-spline registration (through ``itk-elastix``) as a registration model.

``itk-elastix`` is an optional extra (``pip install -e ".[peers]"``) imported only when the
adapter runs. Both images are windowed and placed in ITK physical space with the fixed image's
affine (:mod:`voxelopt.baselines.itk_space`); elastix registers them with its default B-spline
parameter map (multi-resolution, Mattes mutual information + bending energy, adaptive
stochastic gradient descent) and transformix writes the physical deformation field on the fixed
grid, which is turned into our displacement (voxels of the fixed grid,
``moved(x) = moving(x + u(x))``).

ITK's numpy bridge reverses axes (``array[k, j, i]`` is index ``(i, j, k)``); our arrays are
transposed on the way in and out so that ITK index ``c`` is our axis ``c``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence

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

__all__ = ["ElastixBSpline", "elastix_available"]


def _import_itk():
    try:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 (the lazy attribute fails without itk-elastix)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"elastix B-spline needs the itk-elastix package ({exc}): {INSTALL_HINT}"
        ) from None
    return itk


def elastix_available() -> tuple[bool, str]:
    """Whether ``itk-elastix`` imports; the reason when it does not."""
    return peer_available(_import_itk)


class ElastixBSpline(ArrayPeer):
    """elastix B-spline registration as a registration model (CPU, no gradients).

    Args:
        affine: ``(4, 4)`` voxel -> RAS+ mm matrix of the fixed grid (the moving image lies on
            the same grid); ``None`` means 1 mm voxels.
        transforms: elastix default parameter maps run in sequence (``"translation"``,
            ``"rigid"``, ``"affine"``, ``"bspline"``); the B-spline alone by default.
        grid_spacing_mm: final B-spline control-point spacing (mm).
        resolutions: number of pyramid levels.
        iterations: optimiser iterations per level.
        parameters: further elastix parameters overriding the map, e.g.
            ``{"Metric1Weight": ["10"]}``.
        threads: elastix threads (``None``: all cores).
        window_low: CT window lower bound (HU); images are windowed to ``[0, 1]`` first.
        window_high: CT window upper bound (HU).
    """

    def __init__(
        self,
        affine=None,
        transforms: Sequence[str] = ("bspline",),
        grid_spacing_mm: float = 20.0,
        resolutions: int = 3,
        iterations: int = 256,
        parameters: Mapping[str, Sequence[str] | str] | None = None,
        threads: int | None = None,
        window_low: float = HU_WINDOW[0],
        window_high: float = HU_WINDOW[1],
    ) -> None:
        super().__init__()
        self.geometry = ItkGeometry.from_affine(check_affine(affine))
        if not grid_spacing_mm > 0:
            raise ValueError(f"grid_spacing_mm must be > 0, got {grid_spacing_mm!r}")
        for name, value in (("resolutions", resolutions), ("iterations", iterations)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
        transforms = [transforms] if isinstance(transforms, str) else list(transforms)
        allowed = ("translation", "rigid", "affine", "bspline")
        if not transforms or any(t not in allowed for t in transforms):
            raise ValueError(
                f"transforms must be a non-empty list of {allowed}, got {transforms!r}"
            )
        self.transforms = transforms
        self.grid_spacing_mm = float(grid_spacing_mm)
        self.resolutions = resolutions
        self.iterations = iterations
        self.parameters = {
            str(k): [v] if isinstance(v, str) else [str(x) for x in v]
            for k, v in (parameters or {}).items()
        }
        self.threads = threads
        self.window = (float(window_low), float(window_high))

    def parameter_object(self, itk):
        """The elastix parameter object: one default map per transform, with our settings."""
        po = itk.ParameterObject.New()
        for name in self.transforms:
            pmap = po.GetDefaultParameterMap(name, self.resolutions, self.grid_spacing_mm)
            pmap["MaximumNumberOfIterations"] = [str(self.iterations)]
            pmap["WriteResultImage"] = ["false"]
            for key, value in self.parameters.items():
                pmap[key] = value
            po.AddParameterMap(pmap)
        return po

    def _image(self, itk, array: np.ndarray, geometry: ItkGeometry | None = None):
        g = self.geometry if geometry is None else geometry
        image = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0), np.float32))
        image.SetOrigin([float(v) for v in g.origin])
        image.SetSpacing([float(v) for v in g.spacing])
        image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(g.direction)))
        return image

    def register_arrays(
        self, fixed: np.ndarray, moving: np.ndarray, moving_affine=None, matrix=None
    ) -> Tensor:
        """:meth:`ArrayPeer.register_arrays`; with a start ``matrix`` elastix starts from the
        identity there (its default maps have no automatic initialisation)."""
        itk = _import_itk()
        placed = self.moving_geometry(moving_affine, matrix)
        fixed_img, moving_img = self._image(itk, fixed), self._image(itk, moving, placed)
        # Threads through ITK's global default: itk-elastix 0.25's ``number_of_threads``
        # argument crashed (segfault) on a 122x101x112 CT with 2 threads here.
        threader = itk.MultiThreaderBase
        saved = threader.GetGlobalDefaultNumberOfThreads()
        if self.threads is not None:
            threader.SetGlobalDefaultNumberOfThreads(self.threads)
        try:
            _, transform = itk.elastix_registration_method(
                fixed_img,
                moving_img,
                parameter_object=self.parameter_object(itk),
                log_to_console=False,
            )
            # transformix writes deformationField.nii into its output directory (the current
            # one by default): keep it out of the user's folder
            with tempfile.TemporaryDirectory(prefix="voxelopt-transformix-") as scratch:
                field = itk.transformix_deformation_field(
                    moving_img, transform, output_directory=scratch
                )
        finally:
            threader.SetGlobalDefaultNumberOfThreads(saved)
        field = np.asarray(itk.array_from_image(field)).transpose(2, 1, 0, 3)
        if field.shape[:3] != fixed.shape:
            raise ValueError(f"elastix field {field.shape[:3]} is not on the grid {fixed.shape}")
        return self.with_start(physical_to_voxel_displacement(field, self.geometry), matrix)
