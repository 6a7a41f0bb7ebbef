"""Command line: ``voxelopt register`` (a pair of NIfTI files) and ``voxelopt demo``.

Every error a user can cause (missing file, non-3D image, NaN voxels, label maps off their
image's grid, an option out of range) ends with one line ``voxelopt: error: ...`` on stderr
and exit code 2. Outputs are computed completely before anything is written, and each file is
written under a temporary name and renamed, so ``OUT`` never holds half-written results.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from voxelopt.allocator import configure_from_environment
from voxelopt.config import VoxelOptConfig
from voxelopt.features import EXTRACTORS, build_extractor
from voxelopt.io import (
    Volume,
    atomic_output,
    check_same_grid,
    displacement_to_file_grid,
    load_labels,
    load_volume,
    resample_to,
    save_volume,
)
from voxelopt.registration import RegistrationResult, register

AIR_HU = -1000.0


class _Progress:
    """Numbered progress lines on stderr with elapsed seconds (silent with ``--quiet``)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.step, self.start = total, quiet, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.step += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.step}/{self.total}] {message} ({elapsed:.1f} s)", file=sys.stderr)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _add_solver_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features and solver")
    g.add_argument("--features", default="mind", choices=sorted(EXTRACTORS), help="default: mind")
    g.add_argument(
        "--weights", type=Path, help="checkpoint of the feature network (obelisk, universal)"
    )
    g.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=(-500.0, 800.0),
        help="intensity window in HU scaled to [0, 1] (raw, mind, universal); default -500 800",
    )
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="dtype of features and cost volumes (half precision is meant for CUDA)",
    )
    g.add_argument("--downsample", type=_positive_int, default=1, help="solve at 1/N resolution")
    g.add_argument("--levels", type=_positive_int, default=5)
    g.add_argument("--kernel-size", type=_positive_int, default=1, help="search half-width k")
    g.add_argument("--argmin", choices=["hard", "soft"], default="hard")
    g.add_argument("--sigma-mode", choices=["reference", "paper"], default="reference")
    g.add_argument("--no-adaptive", action="store_true", help="fixed Gaussian (ablation)")
    g.add_argument("--no-prefilter", action="store_true", help="do not smooth the cost volume")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxelopt", description="VoxelOpt deformable registration of 3D CT."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser(
        "register",
        help="register a moving NIfTI image onto a fixed one",
        description="Writes moved.nii.gz, displacement.nii.gz (X, Y, Z, 3 in voxels of the fixed "
        "grid; a fixed voxel x samples the moving image at x + u(x)), moved_labels.nii.gz, "
        "report.json and registration.png to OUT.",
    )
    reg.add_argument("--fixed", type=Path, required=True)
    reg.add_argument("--moving", type=Path, required=True)
    reg.add_argument("--out-dir", type=Path, required=True)
    reg.add_argument("--fixed-labels", type=Path)
    reg.add_argument("--moving-labels", type=Path)
    _add_solver_options(reg)

    demo = sub.add_parser(
        "demo",
        help="register a synthetic abdominal phantom pair (no data needed)",
        description="Makes an abdominal phantom and a smoothly deformed copy, writes both as "
        "NIfTI to OUT/inputs, registers them like `voxelopt register` and writes the results.",
    )
    demo.add_argument("--out-dir", type=Path, default=Path("demo_out"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shape", nargs=3, type=_positive_int, default=(96, 80, 112))
    demo.add_argument("--max-displacement-mm", type=float, default=20.0)
    demo.add_argument(
        "--ct",
        type=Path,
        help="make the pair from this real CT (e.g. ../shared/data/abdomen_ct/ct.nii.gz) "
        "instead of the phantom",
    )
    demo.add_argument(
        "--ct-labels", type=Path, help="label map of --ct (scored after registration)"
    )
    _add_solver_options(demo)
    return parser


def _config(args: argparse.Namespace) -> VoxelOptConfig:
    return VoxelOptConfig(
        levels=args.levels,
        kernel_size=args.kernel_size,
        argmin=args.argmin,
        sigma_mode=args.sigma_mode,
        adaptive=not args.no_adaptive,
        prefilter_cost=not args.no_prefilter,
        precision=args.precision,
    )


def _extractor(args: argparse.Namespace):
    low, high = args.window
    if not low < high:
        raise ValueError(f"--window must satisfy LOW < HIGH, got {low} {high}")
    kwargs: dict = {}
    if args.features in ("raw", "mind"):
        kwargs = {"low": low, "high": high}
    if args.features == "universal" and args.weights is None:
        raise ValueError(
            "--features universal needs --weights PATH: the Universal Model checkpoint (its "
            "weights are not distributed with voxelopt)"
        )
    if args.features in ("obelisk", "universal") and args.weights is not None:
        if not args.weights.is_file():
            raise FileNotFoundError(f"--weights file not found: {args.weights}")
        kwargs["weights"] = args.weights
    elif args.weights is not None:
        raise ValueError("--weights is only used with --features obelisk or universal")
    return build_extractor(args.features, **kwargs)


def _load_inputs(args: argparse.Namespace):
    fixed = load_volume(args.fixed)
    moving = load_volume(args.moving)
    fixed_labels = moving_labels = None
    if args.fixed_labels is not None:
        fixed_labels = load_labels(args.fixed_labels)
        check_same_grid(fixed_labels, fixed, ("fixed labels", "fixed image"))
    if args.moving_labels is not None:
        moving_labels = load_labels(args.moving_labels)
        check_same_grid(moving_labels, moving, ("moving labels", "moving image"))
    return fixed, moving, fixed_labels, moving_labels


def _on_fixed_grid(moving: Volume, moving_labels: Volume | None, fixed: Volume):
    """Bring the moving image (and labels) onto the fixed grid through the affines."""
    try:
        check_same_grid(moving, fixed, ("moving", "fixed"))
        return moving, moving_labels, False
    except ValueError:
        moved = resample_to(moving, fixed, order=1, fill_value=AIR_HU)
        labels = resample_to(moving_labels, fixed, order=0) if moving_labels is not None else None
        return moved, labels, True


def _report(args, fixed: Volume, result: RegistrationResult, resampled: bool, config) -> dict:
    return {
        "runtime_s": result.runtime_s,
        "metrics": result.metrics,
        "inputs": {
            "fixed": str(args.fixed),
            "moving": str(args.moving),
            "fixed_labels": str(args.fixed_labels) if args.fixed_labels else None,
            "moving_labels": str(args.moving_labels) if args.moving_labels else None,
            "moving_resampled_to_fixed_grid": resampled,
            "fixed_shape": list(fixed.file_shape),
            "fixed_spacing_mm": list(fixed.spacing),
        },
        "features": args.features,
        "window_hu": list(args.window),
        "downsample": args.downsample,
        "device": args.device,
        "config": config.to_dict(),
        "displacement_convention": (
            "voxels of the fixed grid (file axes), moved(x) = moving(x + u(x))"
        ),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def _write_outputs(out_dir: Path, fixed: Volume, moving: Volume, result, report, labels_given):
    """Write every output file atomically (temporary name, then rename)."""
    from voxelopt.visualize import save_registration_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [save_volume(result.moved, fixed, out_dir / "moved.nii.gz", dtype=np.float32)]
    disp = displacement_to_file_grid(result.displacement, fixed)
    with atomic_output(out_dir / "displacement.nii.gz") as tmp:
        nib.save(nib.Nifti1Image(disp.astype(np.float32), fixed.file_affine), tmp)
    written.append(out_dir / "displacement.nii.gz")
    if result.moved_labels is not None:
        written.append(
            save_volume(result.moved_labels, fixed, out_dir / "moved_labels.nii.gz", np.int16)
        )
    with atomic_output(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    written.append(out_dir / "report.json")
    written.append(
        save_registration_figure(
            out_dir / "registration.png",
            fixed.data,
            moving.data,
            result.moved,
            entropy=result.entropy,
            fixed_labels=labels_given[0],
            moved_labels=result.moved_labels,
            spacing=fixed.spacing,
            title=f"VoxelOpt ({report['features']} features)",
        )
    )
    return written


def run_register(args: argparse.Namespace) -> int:
    progress = _Progress(4, args.quiet)
    config = _config(args)
    extractor = _extractor(args)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir exists and is not a folder: {args.out_dir}")
    progress(f"loading {args.fixed.name} and {args.moving.name}")
    fixed, moving, fixed_labels, moving_labels = _load_inputs(args)
    moving, moving_labels, resampled = _on_fixed_grid(moving, moving_labels, fixed)
    progress(
        f"registering {fixed.shape} voxels with {args.features} features on {args.device}"
        + (" (moving resampled onto the fixed grid)" if resampled else "")
    )
    result = register(
        fixed.data,
        moving.data,
        fixed_labels=fixed_labels.data if fixed_labels is not None else None,
        moving_labels=moving_labels.data if moving_labels is not None else None,
        features=extractor,
        config=config,
        spacing=fixed.spacing,
        downsample=args.downsample,
        device=args.device,
    )
    progress(f"solved in {result.runtime_s:.2f} s; writing outputs")
    report = _report(args, fixed, result, resampled, config)
    written = _write_outputs(
        args.out_dir,
        fixed,
        moving,
        result,
        report,
        (fixed_labels.data if fixed_labels is not None else None,),
    )
    progress(f"wrote {', '.join(p.name for p in written)} to {args.out_dir}")
    _print_summary(result)
    return 0


def _print_summary(result: RegistrationResult) -> None:
    m = result.metrics
    line = f"runtime {result.runtime_s:.2f} s, SDlogJ {m['sdlogj']:.3f}"
    line += f", non-positive Jacobians {100 * m['nonpositive_jacobian_fraction']:.3f} %"
    if "dice_mean" in m:
        line += f", Dice {100 * m['dice_mean']:.1f} %, HD95 {m['hd95_mean_mm']:.1f} mm"
    print(line)


def run_demo(args: argparse.Namespace) -> int:
    from voxelopt.metrics import dice, mean_over_labels
    from voxelopt.phantom import make_pair, make_phantom

    if args.ct is not None:
        like = load_volume(args.ct)
        labels = None
        if args.ct_labels is not None:
            labels_volume = load_labels(args.ct_labels)
            check_same_grid(labels_volume, like, ("--ct-labels", "--ct"))
            labels = labels_volume.data
        hu, spacing = like.data, like.spacing
        if labels is None:
            labels = np.zeros(hu.shape, np.int64)
    else:
        if args.ct_labels is not None:
            raise ValueError("--ct-labels needs --ct")
        spacing = (3.0, 3.0, 3.0)
        hu, labels = make_phantom(tuple(args.shape), spacing=spacing, seed=args.seed)
        like = Volume(
            np.zeros(hu.shape, np.float32),
            np.diag([*spacing, 1.0]),
            np.array([[0, 1], [1, 1], [2, 1]]),
        )
    pair = make_pair(
        hu, labels, max_displacement_mm=args.max_displacement_mm, spacing=spacing, seed=args.seed
    )
    inputs = args.out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    files = {
        "fixed": (pair.fixed_hu, np.float32),
        "moving": (pair.moving_hu, np.float32),
        "fixed_labels": (pair.fixed_labels, np.int16),
        "moving_labels": (pair.moving_labels, np.int16),
    }
    for name, (data, dtype) in files.items():
        save_volume(np.asarray(data[0, 0]), like, inputs / f"{name}.nii.gz", dtype=dtype)
        setattr(args, name, inputs / f"{name}.nii.gz")
    before = mean_over_labels(dice(pair.moving_labels[0, 0], pair.fixed_labels[0, 0]))
    print(f"demo pair written to {inputs} (initial Dice {100 * before:.1f} %)", file=sys.stderr)
    return run_register(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voxelopt`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_from_environment()
    try:
        if args.command == "register":
            return run_register(args)
        return run_demo(args)
    except (
        FileNotFoundError,
        ValueError,
        TypeError,
        ImportError,
        nib.filebasedimages.ImageFileError,
    ) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"voxelopt: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
