"""Real inter-subject benchmark (issue 11): abdomen_ct <-> chest_abdomen_ct, full scans, both ways.

Run from the project root (2 threads for every method; about 20 min on 2 shared cores):

    nice -n 15 python benchmarks/bench_intersubject.py --out runs/intersubject \
        --figures docs/figures --write

Per direction (fixed <- moving) one working grid: the fixed scan at ``--spacing`` mm (3 by
default: abdomen_ct keeps its own 3 mm grid, chest_abdomen_ct is resampled, anti-aliased). Every
method's result is one *total* displacement on that grid against the moving scan placed by the
files' headers: ``moving world point = G (x + u(x))``, ``G`` the grid's voxel -> world matrix.
The headers alone give the two scans no overlap, so every method needs a start: ours
(:func:`voxelopt.affine.align_affine`) or, for ANTs and elastix, their own affine stage.

Beside this script: ``intersubject_case.py`` (a direction's scans on the grid, timing, scoring),
``intersubject_methods.py`` (how each method runs and from which start; the default VoxelOpt
rows go through :func:`voxelopt.pipeline.register_volumes`), ``intersubject_report.py``
(tables, the PNG, the BENCHMARKS.md block).

Scoring (:func:`voxelopt.evaluation.score_registration` on the grid): the organs both scans
contain, only on the fixed voxels whose mapped point falls inside the moving scan's box of
voxel centres ("own FOV"); "common FOV" restricts every method to the voxels covered under our
affine. Runtime: the method's registration with its affine stage, wall and process-CPU seconds.

Options: ``--methods``/``--directions`` run a subset (``--append`` keeps the other methods'
rows in ``--out``), ``--tables-only`` rewrites the tables from the saved rows, ``--ants-seed N``
fixes ANTs' random sampling, ``--spacing`` a coarser grid (smoke runs), ``--stand-in-fov-mask``
adds the old diagnostic rows (fixed image set to air outside the moving field of view; off by
default, the library now handles fields of view itself), ``--write`` puts the tables (summary
and Dice per organ), the command and the figure links into BENCHMARKS.md (marked block
``bench_intersubject``).
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(_k, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# the helper modules sit beside this script (benchmarks/ is sys.path[0] when run as a script)
from intersubject_case import DIRECTIONS, WORKING_MM, direction_tag, make_case, score  # noqa: E402
from intersubject_methods import method_keys, run_method  # noqa: E402
from intersubject_report import (  # noqa: E402
    benchmarks_block,
    figure_path,
    save_figure,
    write_tables,
)

from voxelopt.evaluation import score_columns  # noqa: E402
from voxelopt.tables import write_marked_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/intersubject"), help="rows, tables")
    p.add_argument(
        "--figures", type=Path, default=None, help="folder of the PNGs (none: not drawn)"
    )
    p.add_argument(
        "--directions",
        nargs="+",
        default=list(DIRECTIONS),
        choices=list(DIRECTIONS),
        metavar="D",
        help="fixed<-moving: " + ", ".join(DIRECTIONS) + " (default both)",
    )
    keys = method_keys(stand_in=True)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=keys,
        metavar="KEY",
        help="rows to run (default: all but the *_fovmask ones): " + ", ".join(keys),
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spacing", type=float, default=WORKING_MM, help="working spacing (mm)")
    p.add_argument("--tables-only", action="store_true", help="only rewrite the tables")
    p.add_argument("--append", action="store_true", help="keep other methods' rows in --out")
    p.add_argument("--ants-seed", type=int, default=None, help="ANTs random_seed (default none)")
    p.add_argument(
        "--stand-in-fov-mask",
        action="store_true",
        help="add the old diagnostic rows '*_fovmask': the fixed image set to air outside the "
        "moving field of view under our affine (a stand-in from before the library's FOV "
        "handling)",
    )
    p.add_argument(
        "--write",
        nargs="?",
        type=Path,
        const=ROOT / "BENCHMARKS.md",
        default=None,
        help="put the tables and figure links into this Markdown file (default "
        "BENCHMARKS.md; marked block bench_intersubject); needs --figures",
    )
    args = p.parse_args(argv)
    allowed = method_keys(args.stand_in_fov_mask)
    args.methods = allowed if args.methods is None else args.methods
    if any(k not in allowed for k in args.methods):
        p.error("the *_fovmask rows need --stand-in-fov-mask")
    if args.write is not None and args.figures is None:
        p.error("--write needs --figures (the folder of the PNGs it links)")
    args.command = "python benchmarks/bench_intersubject.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    return args


def _save_rows(path: Path, rows: list[dict]) -> None:
    order = method_keys(stand_in=True)
    path.write_text(json.dumps(sorted(rows, key=lambda r: order.index(r["method"])), indent=1))


def run_row(case, key: str, args: argparse.Namespace, load: float) -> tuple[dict, tuple | None]:
    """One method on one direction: its row and ``(moved image, own FOV)`` for the figure; a
    peer that stops is listed with empty scores (and ``failed``), not dropped."""
    row = {"direction": case.name, "method": key, "load_before": load, "command": args.command}
    try:
        run = run_method(case, key, args.threads, args.ants_seed)
    except (RuntimeError, ValueError) as exc:
        empty = dict.fromkeys(score_columns(case.organs))
        row |= {"start": "-", "wall_s": None, "cpu_s": None, "covered": None}
        return row | {"own": empty, "common": empty, "failed": str(exc).splitlines()[-1]}, None
    scores, shown = score(case, run.total, run.wall)
    return row | {"start": run.start, "wall_s": run.wall, "cpu_s": run.cpu, **scores}, shown


def _log(row: dict) -> None:
    if "failed" in row:
        print(f"[{row['direction']}] {row['method']:34s} FAILED: {row['failed']}", flush=True)
        return
    d, c = (row[tag]["dice"] for tag in ("own", "common"))
    print(
        f"[{row['direction']}] {row['method']:34s} start {row['start']:20s} Dice own "
        f"{'-' if d is None else f'{d:.3f}'} common {'-' if c is None else f'{c:.3f}'} covered "
        f"{row['covered']:.2f} wall {row['wall_s']:6.1f} s cpu {row['cpu_s']:6.1f} s "
        f"load {row['load_before']:.1f}",
        flush=True,
    )


def run_direction(name: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one direction, saved after each in ``<out>/rows_<direction>.json`` (with
    ``--append``, replacing the same methods' rows of an earlier run there); its figure."""
    case = make_case(name, args.spacing)
    print(
        f"[{name}] grid {case.grid.shape} at {np.round(case.grid.spacing, 3)} mm, organs "
        f"{case.organs}, affine {case.affine_time.wall:.2f} s wall",
        flush=True,
    )
    path = args.out / f"rows_{direction_tag(name)}.json"
    earlier = json.loads(path.read_text()) if args.append and path.exists() else []
    earlier = [r for r in earlier if r["method"] not in args.methods]
    rows, shown = [], {}
    for key in args.methods:
        row, shown[key] = run_row(case, key, args, os.getloadavg()[0])
        rows.append(row)
        _save_rows(path, earlier + rows)
        _log(row)
    if args.figures is not None:
        ran = [r for r in rows if shown[r["method"]] is not None]
        save_figure(figure_path(args.figures, name), case, shown, ran)
    return rows


def write_benchmarks(rows: list[dict], args: argparse.Namespace) -> Path:
    """The tables, the commands of their rows and the figure links into ``--write``."""
    commands = list(dict.fromkeys(r.get("command") or "(not recorded)" for r in rows))
    directions = dict.fromkeys(r["direction"] for r in rows)
    figures = [figure_path(args.figures, d) for d in directions]
    figures = [f.resolve() for f in figures if f.exists()]
    block = benchmarks_block(rows, commands, figures, args.write.resolve().parent)
    return write_marked_block(args.write, "bench_intersubject", block)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [] if args.tables_only else args.directions:
        run_direction(name, args)
    rows = [r for f in sorted(args.out.glob("rows_*.json")) for r in json.loads(f.read_text())]
    shown = method_keys(args.stand_in_fov_mask)
    rows = [r for r in rows if r["method"] in shown]
    if not rows:
        raise SystemExit(f"no rows in {args.out}: run without --tables-only first")
    rows.sort(key=lambda r: list(DIRECTIONS).index(r["direction"]))
    print(write_tables(rows, args.out))
    if args.write is not None:
        print(f"wrote {write_benchmarks(rows, args)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
