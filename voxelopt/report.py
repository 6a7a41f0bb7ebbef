"""The files of a registration run: moved image, displacement, labels, figure, report.json.

:func:`write_results` writes a :class:`~voxelopt.pipeline.VolumeRegistration` into a staging
folder (:class:`~voxelopt.outputs.StagedOutput`); :func:`build_report` assembles what
``report.json`` says about the run, and :meth:`~voxelopt.outputs.StagedOutput.commit` writes it
last. :func:`summary_line` is the one line the command line prints on stdout.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from voxelopt.ct import AIR_HU, BTCV13_LABELS
from voxelopt.io import Volume, check_same_grid, save_volume
from voxelopt.outputs import StagedOutput

__all__ = ["INPUTS", "build_report", "registration_figure", "summary_line", "write_results"]

#: The input files a report names.
INPUTS = ("fixed", "moving", "fixed_labels", "moving_labels")


def write_results(
    out: StagedOutput,
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume | None,
    moving_labels: Volume | None,
    result,
    threads: int = 1,
    grid: str = "fixed",
) -> None:
    """Every output file except report.json, into ``out``'s staging folder.

    ``moved.nii.gz`` (float32) and ``moved_labels.nii.gz`` (when labels were given) on the
    fixed image's grid, ``displacement.nii.gz`` (X, Y, Z, 3 in voxels of the fixed grid, file
    axes; streamed slab by slab) and ``registration.png``.

    Args:
        out: the run's staged output folder.
        fixed: the fixed image (its grid and file orientation are written).
        moving: the moving image (any grid; for the figure).
        fixed_labels: the fixed label map, or ``None``.
        moving_labels: the moving label map (any grid), or ``None``.
        result: the :class:`~voxelopt.pipeline.VolumeRegistration`.
        threads: threads compressing the displacement file.
        grid: ``"fixed"`` (Learn2Reg) or ``"working"``: the grid of ``displacement.nii.gz``.
    """
    from concurrent.futures import ThreadPoolExecutor

    def volumes() -> None:
        save_volume(result.moved, fixed, out.path("moved.nii.gz"), dtype=np.float32)
        result.write_displacement(out.path("displacement.nii.gz"), grid=grid, threads=threads)
        if result.moved_labels is not None:
            save_volume(result.moved_labels, fixed, out.path("moved_labels.nii.gz"))

    # the volumes are compressed (zlib releases the GIL) while the figure is drawn
    with ThreadPoolExecutor(1) as pool:
        written = pool.submit(volumes)
        registration_figure(
            out.path("registration.png"), fixed, moving, fixed_labels, moving_labels, result
        )
        written.result()


def _plane_grid(fixed: Volume, axis: int, index: int) -> Volume:
    """The one-voxel slab ``index`` along ``axis`` of the fixed grid, as a grid."""
    affine = fixed.affine.copy()
    affine[:3, 3] += index * affine[:3, axis]
    shape = tuple(1 if i == axis else n for i, n in enumerate(fixed.shape))
    return Volume(np.broadcast_to(np.float32(0), shape), affine, fixed.ornt.copy())


def registration_figure(
    path: str | Path,
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume | None,
    moving_labels: Volume | None,
    result,
) -> Path:
    """Fixed, moving, moved and entropy in an axial and a coronal plane of the fixed grid
    (through the labelled organs; :func:`voxelopt.visualize.choose_slices`), as PNG.

    "moving" is the input on the fixed grid through the files' affines, or, after an affine
    pre-alignment (``result.matrix``), through that too (headed "moving (affine)": two scans of
    different patients often do not overlap in world space at all); "moved" is after the whole
    registration; the Dice "before" is always that of the headers alone. Only those planes of
    the moving image, its labels and the entropy (working grid) are resampled onto the fixed
    grid, so the figure costs no full-resolution volume.
    """
    from voxelopt.grid import resample_to_grid
    from voxelopt.visualize import FigurePlane, choose_slices, save_registration_planes

    labels = fixed_labels.data if fixed_labels is not None else None
    entropy = Volume(result.entropy, result.working_grid.affine, result.working_grid.ornt)
    planes = []
    for axis, index in choose_slices(fixed.shape, labels, fixed.data, (2, 1)).items():
        grid = _plane_grid(fixed, axis, index)

        def onto(volume, order, fill, matrix=None, _grid=grid, _axis=axis):
            if volume is None:
                return None
            data = resample_to_grid(volume, _grid, order, fill, matrix, antialias=False).data
            return data[(slice(None),) * _axis + (0,)]

        def cut(data, _axis=axis, _index=index):  # a view: np.take would copy the volume
            return None if data is None else data[(slice(None),) * _axis + (_index,)]

        planes.append(
            FigurePlane(
                axis,
                index,
                fixed=cut(fixed.data),
                moving=onto(moving, 1, AIR_HU, result.matrix),
                moved=cut(result.moved),
                entropy=onto(entropy, 1, 0.0),
                fixed_labels=cut(labels),
                moving_labels=onto(moving_labels, 0, 0, result.matrix),
            )
        )
    before = None
    if fixed_labels is not None and moving_labels is not None:  # on the working grid, as after
        from voxelopt.metrics import dice, mean_over_labels

        grid = result.working_grid
        f, m = (resample_to_grid(v, grid, 0, 0).data for v in (fixed_labels, moving_labels))
        before = mean_over_labels(dice(m, f))
    after = result.metrics.get("dice")
    names = None
    if labels is not None and set(np.unique(labels).tolist()) <= {0, *BTCV13_LABELS}:
        names = BTCV13_LABELS
    return save_registration_planes(
        path,
        planes,
        fixed.spacing,
        title="VoxelOpt",
        dice_before=before,
        dice_after=after,
        label_names=names,
        moving_heading="moving" if result.matrix is None else "moving (affine)",
    )


def _same_grid(a: Volume, b: Volume) -> bool:
    try:
        check_same_grid(a, b)
    except ValueError:
        return False
    return True


def build_report(
    *,
    inputs: dict,
    options: dict,
    config: dict,
    fixed: Volume,
    moving: Volume,
    result,
    stages_s: dict,
) -> dict:
    """What ``report.json`` says (before :meth:`~voxelopt.outputs.StagedOutput.commit` adds
    ``complete``, ``files`` and ``undefined``).

    Args:
        inputs: ``{"fixed": path, "moving": path, "fixed_labels": path or None, ...}``.
        options: the run's options (``features``, ``window``, ``spacing``, ``device``,
            ``threads``), stored at the top level (``window`` as ``window_hu``).
        config: the solver configuration (:meth:`voxelopt.VoxelOptConfig.to_dict`).
        fixed: the fixed image.
        moving: the moving image.
        result: the :class:`~voxelopt.pipeline.VolumeRegistration`.
        stages_s: seconds per stage (:attr:`voxelopt.progress.Progress.durations`).
    """
    import torch

    options = dict(options)
    if "window" in options:
        options["window_hu"] = list(options.pop("window"))
    grid = result.working_grid
    return {
        "runtime_s": result.runtime_s,
        "metrics": result.metrics,
        "grids": {
            "fixed": {"shape": list(fixed.shape), "spacing_mm": list(fixed.spacing)},
            "working": {"shape": list(grid.shape), "spacing_mm": list(grid.spacing)},
            "metrics": result.metrics_grid,
        },
        "inputs": {
            **{k: None if inputs.get(k) is None else str(inputs[k]) for k in INPUTS},
            "moving_resampled_to_fixed_grid": not _same_grid(moving, fixed),
        },
        **options,
        "config": config,
        "stages_s": dict(stages_s),
        "displacement_convention": (
            "voxels of the fixed grid (file axes), moved(x) = moving(x + u(x))"
        ),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def summary_line(metrics: dict) -> str:
    """``runtime 1.23 s, SDlogJ 0.120, non-positive Jacobians 0.000 %, Dice 87.7 %, ...``."""

    def fmt(value, scale=1.0, digits=3) -> str:
        return "undefined" if value is None else f"{scale * value:.{digits}f}"

    m = metrics
    line = f"runtime {fmt(m.get('runtime_s'), digits=2)} s, SDlogJ {fmt(m.get('sdlogj_l2r'))}"
    line += f", non-positive Jacobians {fmt(m.get('nonpositive_jacobian'), 100)} %"
    if m.get("dice") is not None:
        line += f", Dice {fmt(m['dice'], 100, 1)} %, HD95 {fmt(m.get('hd95'), digits=1)} mm"
    return line
