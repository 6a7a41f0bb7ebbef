"""The ``voxelopt`` argument parser: built without importing torch, nibabel or numpy.

``voxelopt --help`` and argument errors therefore answer in about 0.1 s; the heavy modules
are imported by the commands' run functions (:mod:`voxelopt.cli.register`,
:mod:`voxelopt.cli.batch`). Names the help text shows that live in heavy modules are copied
here (:data:`FEATURE_NAMES`, :data:`VOXEL_BUDGET`); ``tests/test_cli.py`` checks that the
copies match their sources.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

__all__ = ["FEATURE_NAMES", "VOXEL_BUDGET", "available_cores", "build_parser"]

#: :func:`voxelopt.features.available_extractors` (for the help text only).
FEATURE_NAMES = (
    "mind",
    "mind_obelisk_head",
    "obelisk",
    "obelisk_decoder",
    "obelisk_decoder_coarse",
    "obelisk_decoder_fine",
    "raw",
    "universal",
)
#: :data:`voxelopt.grid.DEFAULT_VOXEL_BUDGET` (for the help text only).
VOXEL_BUDGET = 2_500_000


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line ``voxelopt: error: ...`` (no usage block), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"voxelopt: error: {message} (see {self.prog} --help)\n")


def _named(name: str):
    """Give an argparse ``type`` function the name argparse prints (``invalid <name> value``)."""

    def rename(fn):
        fn.__name__ = name
        return fn

    return rename


@_named("positive integer")
def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


@_named("spacing")
def spacing_mm(text: str) -> float | str:
    """``auto`` or a voxel size in mm (> 0)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 'auto' or millimetres > 0, got {text!r}")
    return value


@_named("feature extractor name")
def feature_name(text: str) -> str:
    """A name :func:`voxelopt.features.parse_extractor_name` accepts (imports the registry)."""
    from voxelopt.features import parse_extractor_name

    try:
        parse_extractor_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.lower()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _add_feature_options(g, affine: str) -> None:
    g.add_argument(
        "--features",
        default="mind",
        type=feature_name,
        metavar="NAME",
        help=f"{', '.join(FEATURE_NAMES)}, or several joined by '+' with optional "
        "':WEIGHT' (e.g. mind+obelisk:0.5); default: mind",
    )
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
    g.add_argument(
        "--affine",
        choices=["none", "rigid", "affine"],
        default=affine,
        help=f"pre-alignment before the deformable stage (default: {affine}; none keeps the "
        "headers' alignment); register and demo write it as affine.txt (4x4 world matrix, "
        "RAS+ mm) and affine.tfm (ITK), register-batch folds it into each field",
    )
    g.add_argument(
        "--no-fov",
        action="store_true",
        help="let every working voxel count, also where the moving image has no data "
        "(outside its field of view after pre-alignment, or in constant edge slabs): the "
        "published behaviour; by default such voxels carry no cost signal",
    )


def _add_export(g) -> None:
    g.add_argument(
        "--export",
        choices=["itk"],
        action="append",
        default=[],
        help="also write displacement_itk.nii.gz: world displacement in mm, LPS, that ANTs, "
        "SimpleITK and 3D Slicer read as a displacement-field transform",
    )
    g.add_argument(
        "--displacement-grid",
        choices=["fixed", "working"],
        default="fixed",
        help="grid of displacement.nii.gz: fixed (default, Learn2Reg: the fixed file's grid) or "
        "working (the solver's grid, its affine in the file: 0.2-0.9 s instead of 7-15 s for a "
        "512x512x250 scan)",
    )


#: the names of :data:`voxelopt.config.PRESETS` (not imported: the parser stays torch-free)
PRESET_NAMES = ("paper", "fixed-sigma")


def _add_solver_options(
    p: argparse.ArgumentParser, export: bool = True, affine: str = "affine"
) -> None:
    g = p.add_argument_group("features and solver")
    _add_feature_options(g, affine)
    if export:
        _add_export(g)
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="dtype of features and cost volumes (half precision is meant for CUDA: on CPU "
        "it is slower, float16 about 3x)",
    )
    g.add_argument(
        "--spacing",
        type=spacing_mm,
        default="auto",
        metavar="MM|auto",
        help="voxel size in mm of the grid the solver works on; auto (default): the fixed "
        f"image's own, coarsened where that grid exceeds {VOXEL_BUDGET / 1e6:g} M voxels",
    )
    g.add_argument("--downsample", type=positive_int, help=argparse.SUPPRESS)  # gone: --spacing
    g.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="paper",
        help="named solver configuration (voxelopt.config.PRESETS): paper (default, the "
        "published one) or fixed-sigma (fixed Gaussian, sigma 0.8: better Dice in the method "
        "ablation, BENCHMARKS.md); the options below that keep their defaults leave it as is",
    )
    g.add_argument("--levels", type=positive_int, default=5, help="pyramid levels (default 5)")
    g.add_argument("--kernel-size", type=positive_int, default=1, help="search half-width k")
    g.add_argument("--argmin", choices=["hard", "soft"], default="hard")
    g.add_argument("--sigma-mode", choices=["reference", "paper"], default="reference")
    g.add_argument("--no-adaptive", action="store_true", help="fixed Gaussian (ablation)")
    g.add_argument("--no-prefilter", action="store_true", help="do not smooth the cost volume")
    cores = available_cores()
    g.add_argument(
        "--threads",
        type=positive_int,
        default=cores,
        help=f"CPU threads (default: the cores available, here {cores})",
    )
    g.add_argument("--quiet", action="store_true", help="no progress lines (warnings stay)")


def _add_register(sub) -> None:
    reg = sub.add_parser(
        "register",
        help="register a moving NIfTI image onto a fixed one",
        description="Writes moved.nii.gz, displacement.nii.gz (X, Y, Z, 3 in voxels of the fixed "
        "grid; a fixed voxel x samples the moving image at x + u(x)), moved_labels.nii.gz, "
        "registration.png and, last, report.json to OUT, replacing what OUT held as a whole.",
    )
    reg.add_argument("--fixed", type=Path, required=True)
    reg.add_argument("--moving", type=Path, required=True)
    reg.add_argument("--out-dir", type=Path, required=True)
    reg.add_argument("--fixed-labels", type=Path, help="label map of --fixed (for Dice, HD95)")
    reg.add_argument("--moving-labels", type=Path, help="label map of --moving (warped)")
    reg.add_argument(
        "--fixed-mask",
        type=Path,
        help="mask on --fixed's grid (nonzero = use): voxels outside carry no cost signal",
    )
    reg.add_argument("--moving-mask", type=Path, help="mask on --moving's grid, likewise")
    _add_solver_options(reg)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="register a synthetic abdominal phantom pair (no data needed)",
        description="Makes an abdominal phantom and a smoothly deformed copy, writes both as "
        "NIfTI to OUT/inputs, registers them like `voxelopt register` and writes the results.",
    )
    demo.add_argument("--out-dir", type=Path, default=Path("demo_out"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shape", nargs=3, type=positive_int, default=(96, 80, 112))
    demo.add_argument("--max-displacement-mm", type=float, default=20.0)
    demo.add_argument(
        "--ct",
        type=Path,
        help="make the pair from this real CT (e.g. ../shared/data/abdomen_ct/ct.nii.gz) "
        "instead of the phantom",
    )
    demo.add_argument("--ct-labels", type=Path, help="label map of --ct (scored)")
    _add_solver_options(demo, affine="none")  # one scan deformed: nothing to pre-align


def _add_batch(sub) -> None:
    batch = sub.add_parser(
        "register-batch",
        help="register many pairs (a Learn2Reg dataset JSON or a CSV) in one process",
        description="Registers every pair of a Learn2Reg dataset JSON (its registration_val or "
        "registration_test list; labels from labelsTr/ when present) or of a CSV (columns "
        "fixed, moving, optional fixed_labels, moving_labels; paths relative to the CSV). "
        "Writes OUT/disp_FIXED_MOVING.nii.gz per pair (the Learn2Reg submission layout), "
        "OUT/pairs.csv (scores per pair) and OUT/summary.md. Pairs already in pairs.csv "
        "with their field on disk are skipped, so an interrupted run resumes. Exit code 1 "
        "when some pairs failed (each named on stderr).",
    )
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", type=Path, help="Learn2Reg dataset JSON")
    source.add_argument("--pairs", type=Path, help="CSV of pairs")
    batch.add_argument(
        "--split",
        default="val",
        help="which list of the dataset JSON: val (registration_val, default), test "
        "(registration_test) or any key of the JSON",
    )
    batch.add_argument("--out-dir", type=Path, required=True)
    batch.add_argument(
        "--limit", type=positive_int, help="only the first N pairs of the list (a trial run)"
    )
    _add_solver_options(batch, export=False)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``voxelopt`` command (imports nothing heavy)."""
    parser = _Parser(prog="voxelopt", description="VoxelOpt deformable registration of 3D CT.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_register(sub)
    _add_demo(sub)
    _add_batch(sub)
    return parser
