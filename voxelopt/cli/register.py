"""``voxelopt register`` and ``voxelopt demo``: one pair into one complete output folder.

Imported only when one of these commands runs (it imports torch and nibabel); the helpers
that check options, build the extractor, load a pair and pre-align it are shared with
``voxelopt register-batch`` (:mod:`voxelopt.cli.batch`).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import torch

from voxelopt.checks import check_label_values, check_pyramid_fits, check_world_overlap
from voxelopt.config import VoxelOptConfig
from voxelopt.features import base_extractors, build_extractor
from voxelopt.grid import working_grid, working_spacing
from voxelopt.io import Volume, check_same_grid, load_labels, load_volume
from voxelopt.outputs import SignalGuard, StagedOutput
from voxelopt.pipeline import register_volumes
from voxelopt.progress import Progress
from voxelopt.pyramid import MIN_COARSE_SIZE
from voxelopt.report import INPUTS, build_report, summary_line, write_results

__all__ = ["run_demo", "run_register"]


def solver_config(args: argparse.Namespace) -> VoxelOptConfig:
    """The solver configuration the options ask for: ``--preset`` (default ``paper``), then
    every option whose value differs from the published default."""
    asked = dict(
        levels=args.levels,
        kernel_size=args.kernel_size,
        argmin=args.argmin,
        sigma_mode=args.sigma_mode,
        adaptive=not args.no_adaptive,
        prefilter_cost=not args.no_prefilter,
        precision=args.precision,
    )
    default = VoxelOptConfig()
    changed = {k: v for k, v in asked.items() if v != getattr(default, k)}
    return VoxelOptConfig.preset(getattr(args, "preset", "paper"), **changed)


def check_options(args: argparse.Namespace) -> None:
    """Refuse contradictory options and warn about wasteful ones (before any work)."""
    low, high = args.window
    if not low < high:
        raise ValueError(f"--window must satisfy LOW < HIGH, got {low} {high}")
    if args.downsample is not None:
        raise ValueError(
            "--downsample was replaced by --spacing MM, the voxel size of the working grid "
            "(e.g. --spacing 4 solves on 4 mm voxels)"
        )
    bases = set(base_extractors(args.features))
    if "universal" in bases and args.weights is None:
        raise ValueError(
            "--features universal needs --weights PATH: the Universal Model checkpoint (its "
            "weights are not distributed with voxelopt)"
        )
    if args.weights is not None and not bases & {"obelisk", "universal"}:
        raise ValueError("--weights is only used with --features obelisk or universal")
    if args.weights is not None and {"obelisk", "universal"} <= bases:
        raise ValueError("--weights is ambiguous with both obelisk and universal branches")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if args.device == "cpu" and args.precision in ("float16", "bfloat16"):
        slower = "about 3x" if args.precision == "float16" else "about 1.5x"
        warnings.warn(
            f"--precision {args.precision} on CPU is {slower} slower than float32 (it only "
            "halves the memory of the cost volumes; half precision is meant for CUDA)",
            stacklevel=2,
        )
    fixed_labels = getattr(args, "fixed_labels", None)
    if (fixed_labels is None) != (getattr(args, "moving_labels", None) is None):
        option, other = ("--fixed-labels", "--moving-labels")[:: 1 if fixed_labels else -1]
        raise ValueError(
            f"{option} needs {other} too: Dice and HD95 compare the warped moving labels "
            "with the fixed labels; give both label maps or neither"
        )


def build_feature_extractor(args: argparse.Namespace):
    """The feature extractor; a ``--weights`` file is loaded (and so validated) here."""
    low, high = args.window
    kwargs: dict = {}
    if set(base_extractors(args.features)) & {"raw", "mind"}:
        kwargs = {"low": low, "high": high}
    if args.weights is None:
        return build_extractor(args.features, **kwargs)
    if not args.weights.is_file():
        raise FileNotFoundError(f"--weights file not found: {args.weights}")
    try:
        return build_extractor(args.features, weights=args.weights, **kwargs)
    except Exception as exc:  # torch.load and load_state_dict raise many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(
            f"--weights {args.weights} is not a checkpoint of the {args.features} network: {reason}"
        ) from None


def load_labels_for(path, image: Volume, option: str, image_option: str | None = None):
    """The label map at ``path`` (``None`` for none), checked against its image's grid;
    ``option``/``image_option`` name both in messages (default: ``--fixed-labels`` ->
    ``--fixed``)."""
    if path is None:
        return None
    volume = load_labels(path)
    check_same_grid(volume, image, (option, image_option or option.replace("-labels", "")))
    check_label_values(volume.data, option)
    return volume


def load_inputs(args, progress: Progress):
    """Images and label maps of ``args`` (``fixed``, ``moving``, ``fixed_labels``,
    ``moving_labels``), checked: readable, labels on their image's grid and plausible, fixed
    and moving overlapping in world space (unless an affine search looks for the overlap)."""
    names = ", ".join(str(p.name) for p in (args.fixed, args.moving))

    def image_and_labels(name: str):
        image = load_volume(getattr(args, name))
        return image, load_labels_for(getattr(args, f"{name}_labels"), image, f"--{name}-labels")

    with progress.stage("loading", names):
        # the two images in two threads (gzip and numpy release the GIL): 0.13 -> 0.08 s for
        # a 96 x 80 x 128 pair with labels; errors are reported fixed first
        with ThreadPoolExecutor(2) as pool:
            loads = [pool.submit(image_and_labels, name) for name in ("fixed", "moving")]
            (fixed, fixed_labels), (moving, moving_labels) = (job.result() for job in loads)
        for name, image in (("fixed", fixed), ("moving", moving)):  # checked as labels are
            path = getattr(args, f"{name}_mask", None)
            mask = load_labels_for(path, image, f"--{name}-mask", f"--{name}")
            setattr(args, f"{name}_mask_volume", mask)
    if args.affine == "none":  # a pre-alignment searches for the overlap itself
        check_world_overlap(
            fixed.affine, fixed.shape, moving.affine, moving.shape, ("--fixed", "--moving")
        )
    return fixed, moving, fixed_labels, moving_labels


def align(mode: str, fixed: Volume, moving: Volume, progress: Progress):
    """The affine pre-alignment (:func:`voxelopt.affine.align_affine`), checked; ``None``
    for ``mode == "none"``."""
    if mode == "none":
        return None
    from voxelopt.affine import align_affine

    with progress.stage("affine", f"{mode} pre-alignment"):
        aligned = align_affine(fixed, moving, mode=mode)
    if not math.isfinite(aligned.cost_final):
        raise ValueError(
            "--fixed and --moving do not overlap even after the affine search: are they scans "
            "of the same body region?"
        )
    return aligned


def _pre_align(args, fixed: Volume, moving: Volume, progress: Progress, out: StagedOutput):
    """The affine pre-alignment (``--affine``): its world matrix and the report entry; both
    ``None`` with ``--affine none``. Writes affine.txt and affine.tfm into ``out``."""
    aligned = align(args.affine, fixed, moving, progress)
    if aligned is None:
        return None, None
    from voxelopt.affine import write_itk_transform, write_world_matrix

    write_world_matrix(out.path("affine.txt"), aligned.matrix)
    write_itk_transform(out.path("affine.tfm"), aligned.matrix)
    info = aligned.to_dict() | {
        "mode": args.affine,
        "files": ["affine.txt", "affine.tfm"],
        "convention": "fixed-world RAS+ point p corresponds to moving-world point matrix @ p; "
        "affine.tfm is the same map in ITK's LPS convention",
    }
    return aligned.matrix, info


def check_working_grid(args: argparse.Namespace, fixed: Volume) -> Volume:
    """The grid the solver will run on, checked against the pyramid (before heavy work)."""
    if args.spacing != "auto" and args.spacing < min(fixed.spacing):
        warnings.warn(
            f"--spacing {args.spacing:g} is finer than the fixed image "
            f"({min(fixed.spacing):.2f} mm): its own spacing is used",
            stacklevel=2,
        )
    grid = working_grid(fixed, working_spacing(fixed.shape, fixed.spacing, args.spacing))
    check_pyramid_fits(grid.shape, args.levels, MIN_COARSE_SIZE, "--levels", "--spacing")
    return grid


def _check_memory(args: argparse.Namespace, extractor) -> None:
    """Stop before loading when the run's estimated peak memory exceeds what is available
    (from the file headers; one line naming the --spacing that fits)."""
    from voxelopt.memory import check_registration_memory

    try:
        fixed, moving = nib.load(args.fixed), nib.load(args.moving)
        zooms = fixed.header.get_zooms()[:3]
    except Exception:
        return  # unreadable: loading reports it in one line
    check_registration_memory(
        fixed.shape[:3],
        zooms,
        moving.shape[:3],
        spacing=args.spacing,
        channels=extractor.out_channels,
        levels=args.levels,
        labels=args.fixed_labels is not None,
    )


def _write_outputs(args, out: StagedOutput, fixed, moving, labels, result, matrix, progress):
    with progress.stage("writing", "outputs on the fixed grid"):
        write_results(
            out, fixed, moving, *labels, result, threads=args.threads, grid=args.displacement_grid
        )
        if "itk" in args.export:
            from voxelopt.export import export_itk_displacement

            field = result.displacement()[0]
            # the field already holds the affine: the ITK field needs no matrix on top
            export_itk_displacement(out.path("displacement_itk.nii.gz"), field, fixed)


def _register_into(args, out: StagedOutput, progress: Progress, shown: dict) -> int:
    """The registration of ``args.fixed``/``args.moving`` into the staged ``out``."""
    check_options(args)
    extractor = build_feature_extractor(args)
    _check_memory(args, extractor)
    fixed, moving, fixed_labels, moving_labels = load_inputs(args, progress)
    check_working_grid(args, fixed)
    matrix, affine_info = _pre_align(args, fixed, moving, progress, out)
    with progress.events():
        result = register_volumes(
            fixed,
            moving,
            fixed_labels=fixed_labels,
            moving_labels=moving_labels,
            extractor=extractor,
            config=solver_config(args),
            spacing=args.spacing,
            matrix=matrix,
            fixed_mask=getattr(args, "fixed_mask_volume", None),
            moving_mask=getattr(args, "moving_mask_volume", None),
            field_of_view=not args.no_fov,
            device=args.device,
            progress=progress,
        )
    labels = (fixed_labels, moving_labels)
    _write_outputs(args, out, fixed, moving, labels, result, matrix, progress)
    shown = {k: shown.get(k, getattr(args, k)) for k in INPUTS}
    keys = ("features", "window", "spacing", "device", "threads", "displacement_grid", "affine")
    options = {k: getattr(args, k) for k in keys}
    report = build_report(
        inputs=shown,
        options=options,
        config=solver_config(args).to_dict(),
        fixed=fixed,
        moving=moving,
        result=result,
        stages_s=progress.durations,
    )
    report["affine"] = affine_info
    report["coverage"] = {
        "share_of_working_grid": result.coverage,
        "masks": {k: _path_or_none(getattr(args, f"{k}_mask", None)) for k in ("fixed", "moving")},
        "field_of_view": not args.no_fov,
    }
    files = out.commit(report)
    progress.line(f"complete: {len(files)} files in {out.out_dir}")
    print(summary_line(result.metrics))
    return 0


def _path_or_none(path) -> str | None:
    return None if path is None else str(path)


def run_register(args: argparse.Namespace, progress: Progress, guard: SignalGuard) -> int:
    """``voxelopt register``: OUT is checked (staging folder made) before anything else."""
    with StagedOutput(args.out_dir, guard) as out:
        return _register_into(args, out, progress, shown={})


def run_demo(args: argparse.Namespace, progress: Progress, guard: SignalGuard) -> int:
    """``voxelopt demo``: the pair is written into OUT/inputs, then registered into OUT."""
    from voxelopt.demo import write_demo_inputs

    with StagedOutput(args.out_dir, guard) as out:
        with progress.stage("phantom", "making the demo pair"):
            staged, shown, initial = write_demo_inputs(
                out,
                shape=args.shape,
                seed=args.seed,
                max_displacement_mm=args.max_displacement_mm,
                ct=args.ct,
                ct_labels=args.ct_labels,
            )
        for name in INPUTS:
            setattr(args, name, staged.get(name))
        dice = "no labels" if initial is None else f"initial Dice {100 * initial:.1f} %"
        print(f"demo pair made ({dice})", file=sys.stderr)
        return _register_into(args, out, progress, shown)
