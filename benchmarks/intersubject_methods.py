"""How each method of ``bench_intersubject.py`` runs, and from which start.

Every runner returns a :class:`Run`: the method's total displacement ``(1, 3, D, H, W)`` (voxels
of the case's working grid) against the moving scan placed by the files' headers, its runtime
(wall and process-CPU s; for rows that start from our affine, :func:`voxelopt.affine.align_affine`
included) and the start it came from. Method keys (:func:`method_keys`):

* ``initial_header``, ``initial_affine``: no registration; the headers alone, our affine alone.
* ``voxelopt_<feature>_<adaptive|fixed>`` (``..._header``: from the headers instead of our
  affine): :func:`run_voxelopt`, i.e. the library's :func:`voxelopt.pipeline.register_volumes`
  with the start matrix, so these rows measure whatever field-of-view handling the library has.
  ``fixed``: ``adaptive=False`` (the config's ``fixed_sigma``).
* ``convex_adam`` (``..._header``): ConvexAdam's defaults on the working grid, the moving scan
  resampled through our affine (or the headers); the field is composed with the affine.
* ``*_fovmask`` (only with ``--stand-in-fov-mask``): the old diagnostic, not a library feature:
  the fixed image set to air outside the moving scan's field of view under our affine, VoxelOpt
  (through the model, not the pipeline) or ConvexAdam on the grid, as above.
* ``ants``, ``elastix``: the adapters of :mod:`voxelopt.baselines` (ANTs SyN: rigid, affine,
  SyN, from its centre-of-mass start; elastix: default affine map from an automatic
  centre-of-gravity start, then the adapter's default B-spline map) with the fixed working grid
  and the moving scan on its own grid (the two scans' world boxes need not overlap).
  ``ants_ours``, ``elastix_ours``: from our affine (the adapters' ``matrix``: ANTs then starts at
  the identity, elastix without automatic initialisation). elastix is retried with
  ``RequiredRatioOfValidSamples 0.05`` when it stops with too few samples inside the moving
  image (said in the row's start).

The torch methods are warmed up on a 48^3 crop of the grid first (numba/JIT compilation not
timed); resampling onto the grids is not timed for any method. The peers' runtime includes
writing their transform as a dense field on the grid (ANTs' composition, transformix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from intersubject_case import timed

from voxelopt.affine import compose_affine_and_field
from voxelopt.affine.geometry import affine_displacement
from voxelopt.baselines.elastix import ElastixBSpline
from voxelopt.ct import AIR_HU
from voxelopt.features.intensity import window

FEATURES = ("raw", "mind", "obelisk", "mind+obelisk")
OURS, HEADERS, STAND_IN = "ours (align_affine)", "headers only", "ours + FOV mask"


def method_keys(stand_in: bool = False) -> list[str]:
    """Every row, in table order; the ``*_fovmask`` stand-in rows only with ``stand_in``."""
    voxelopt = [f"voxelopt_{f}_{a}" for f in FEATURES for a in ("adaptive", "fixed")]
    keys = ["initial_header", "initial_affine", *voxelopt, "convex_adam"]
    keys += ["voxelopt_mind_adaptive_header", "convex_adam_header"]
    if stand_in:
        keys += [f"{k}_fovmask" for k in (*voxelopt, "convex_adam")]
    return keys + ["ants", "elastix", "ants_ours", "elastix_ours"]


@dataclass
class Run:
    """A method's result: total displacement ``(1, 3, D, H, W)``, seconds, start."""

    total: torch.Tensor
    wall: float
    cpu: float
    start: str


def _after_our_affine(run: Run, case) -> Run:
    """The run's time with our affine stage added (a run that started from it)."""
    t = case.affine_time
    return Run(run.total, run.wall + t.wall, run.cpu + t.cpu, run.start)


def _grid_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def _warm_up(model, fixed_w: np.ndarray, moving_w: np.ndarray) -> None:
    """One call on a 48^3 crop of the grid (numba/JIT compilation, first-call allocations)."""
    crop = tuple(slice(max(n // 2 - 24, 0), n // 2 + 24) for n in fixed_w.shape)
    with torch.no_grad():  # not inference_mode: ConvexAdam's Adam stage enables grad inside
        model(_grid_tensor(fixed_w[crop]), _grid_tensor(moving_w[crop]))


def _voxelopt_model(feature: str, adaptive: bool):
    from voxelopt.registration import VoxelOptRegistration

    return VoxelOptRegistration(feature, adaptive=adaptive).eval()


class _StageCpu:
    """Progress callback of :func:`register_volumes`: CPU seconds of features and solve."""

    def __init__(self) -> None:
        self.cpu, self._start = 0.0, 0.0

    def __call__(self, stage: str, event: str, info: dict) -> None:
        if stage in ("features", "solve") and event == "start":
            self._start = time.process_time()
        elif stage in ("features", "solve") and event == "end":
            self.cpu += time.process_time() - self._start


def run_voxelopt(case, feature: str, adaptive: bool, matrix: np.ndarray | None) -> Run:
    """A default VoxelOpt row: :func:`voxelopt.pipeline.register_volumes` on the case's scans
    at its working spacing, through the start ``matrix`` (``None``: the headers).

    Runtime: features and solve (the pipeline's ``runtime_s``), not resampling or warping.
    """
    from voxelopt.pipeline import register_volumes

    model = _voxelopt_model(feature, adaptive)
    moving_w = case.moving_header_w if matrix is None else case.moving_affine_w
    _warm_up(model, case.fixed_w, moving_w)
    cpu = _StageCpu()
    res = register_volumes(
        case.fixed, case.moving, model=model, spacing=case.spacing, matrix=matrix, progress=cpu
    )
    grid = res.working_grid
    if grid.shape != case.grid.shape or not np.allclose(grid.affine, case.grid.affine):
        raise ValueError(f"register_volumes ran on {grid.shape}, the case's grid is not that")
    u = res.displacement_working
    total = u if matrix is None else compose_affine_and_field(matrix, u, case.grid.affine)
    return Run(total, res.runtime_s, cpu.cpu, HEADERS if matrix is None else OURS)


def _run_on_grid(case, model, fixed_w, moving_w, matrix, start: str) -> Run:
    """A torch model on the grid arrays (warm-up first); the field composed with ``matrix``."""
    _warm_up(model, fixed_w, moving_w)
    f, m = _grid_tensor(fixed_w), _grid_tensor(moving_w)
    with torch.no_grad(), timed() as clock:
        field = model(f, m).float()
    total = field if matrix is None else compose_affine_and_field(matrix, field, case.grid.affine)
    return Run(total, clock.wall, clock.cpu, start)


def run_convex_adam(case, matrix: np.ndarray | None) -> Run:
    """ConvexAdam (defaults) on the grid from our affine (``matrix``) or the headers."""
    from voxelopt.baselines.convex_adam import ConvexAdam

    moving_w = case.moving_header_w if matrix is None else case.moving_affine_w
    start = HEADERS if matrix is None else OURS
    return _run_on_grid(case, ConvexAdam(), case.fixed_w, moving_w, matrix, start)


def run_stand_in(case, base: str) -> Run:
    """The old diagnostic: the fixed image set to air outside the moving scan's field of view
    under our affine; ``base`` is ``convex_adam`` or ``voxelopt_<feature>_<mode>``."""
    if base == "convex_adam":
        from voxelopt.baselines.convex_adam import ConvexAdam

        model = ConvexAdam()
    else:
        feature, mode = base.split("_")[1:3]
        model = _voxelopt_model(feature, mode == "adaptive")
    fixed_w = np.where(case.common_inside, case.fixed_w, np.float32(AIR_HU))
    return _run_on_grid(case, model, fixed_w, case.moving_affine_w, case.matrix, STAND_IN)


def _peer_arrays(model, case) -> tuple[np.ndarray, np.ndarray]:
    """The fixed grid array and the moving scan on its own grid, windowed like the adapter's
    ``forward``."""
    return tuple(
        window(torch.from_numpy(np.asarray(a, np.float32)), *model.window).numpy()
        for a in (case.fixed_w, case.moving_own.data)
    )


def run_ants(case, threads: int, matrix: np.ndarray | None, seed: int | None = None) -> Run:
    """ANTs SyN (``type_of_transform="SyN"``, ANTsPy defaults) through
    :class:`voxelopt.baselines.ants.AntsSyN`; ``seed``: its ``random_seed``."""
    from voxelopt.baselines.ants import AntsSyN

    extra = {} if seed is None else {"random_seed": seed}
    model = AntsSyN(case.grid.affine, "SyN", threads=threads, **extra)
    fixed, moving = _peer_arrays(model, case)
    with timed() as clock:
        u = model.register_arrays(
            fixed, moving, moving_affine=case.moving_own.affine, matrix=matrix
        )
    start = "ANTs' own (c.o.m.+affine)" if matrix is None else "ours, then ANTs' affine"
    return Run(u, clock.wall, clock.cpu, start)


class _CentredElastix(ElastixBSpline):
    """The adapter with the first (affine) map started at the images' centres of gravity
    (elastix's default affine map has no initialisation and stops at once on offset boxes)."""

    def parameter_object(self, itk):
        po = super().parameter_object(itk)
        pmap = po.GetParameterMap(0)
        pmap["AutomaticTransformInitialization"] = ["true"]
        pmap["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        po.SetParameterMap(0, pmap)
        return po


def run_elastix(case, threads: int, matrix: np.ndarray | None) -> Run:
    """elastix affine + B-spline (20 mm, 3 levels, 256 iterations) through
    :class:`voxelopt.baselines.elastix.ElastixBSpline`; retried with at least 5 % valid
    samples when too few fixed samples map inside the moving image (partial overlap)."""
    cls = _CentredElastix if matrix is None else ElastixBSpline
    start = "elastix's own (c.o.g.+affine)" if matrix is None else "ours, then elastix' affine"
    place = {"moving_affine": case.moving_own.affine, "matrix": matrix}
    model = cls(case.grid.affine, ("affine", "bspline"), threads=threads)
    fixed, moving = _peer_arrays(model, case)
    with timed() as clock:
        try:
            u = model.register_arrays(fixed, moving, **place)
        except RuntimeError:  # "Too many samples map outside moving image buffer" (partial FOV)
            retry = {"RequiredRatioOfValidSamples": "0.05"}
            model = cls(case.grid.affine, ("affine", "bspline"), threads=threads, parameters=retry)
            u = model.register_arrays(fixed, moving, **place)
            start += " [retry: valid samples >= 5 %]"
    return Run(u, clock.wall, clock.cpu, start)


def run_method(case, key: str, threads: int = 2, ants_seed: int | None = None) -> Run:
    """The :class:`Run` of one row (a key of :func:`method_keys` with ``stand_in=True``)."""
    if key not in method_keys(stand_in=True):
        raise ValueError(f"key must be one of method_keys(stand_in=True), got {key!r}")
    if key == "initial_header":
        return Run(torch.zeros(1, 3, *case.grid.shape), 0.0, 0.0, HEADERS)
    if key == "initial_affine":
        u = affine_displacement(case.matrix, case.grid.shape, case.grid.affine)
        return _after_our_affine(Run(u, 0.0, 0.0, OURS), case)
    if key.endswith("_fovmask"):
        return _after_our_affine(run_stand_in(case, key.removesuffix("_fovmask")), case)
    if key.startswith(("ants", "elastix")):
        matrix = case.matrix if key.endswith("_ours") else None
        if key.startswith("ants"):
            run = run_ants(case, threads, matrix, ants_seed)
        else:
            run = run_elastix(case, threads, matrix)
    else:
        base = key.removesuffix("_header")
        matrix = None if key.endswith("_header") else case.matrix
        if base == "convex_adam":
            run = run_convex_adam(case, matrix)
        else:
            feature, mode = base.split("_")[1:3]
            run = run_voxelopt(case, feature, mode == "adaptive", matrix)
    return run if matrix is None else _after_our_affine(run, case)
