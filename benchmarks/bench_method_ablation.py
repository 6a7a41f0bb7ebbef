"""Method ablation of the VoxelOpt solver on real pairs (issue 12), MIND features throughout.

Run from the project root (about 15 min on 2 shared cores with the defaults):

    python benchmarks/bench_method_ablation.py --out runs/method_ablation --write

Variants (:data:`VARIANTS`) change fields of :class:`voxelopt.VoxelOptConfig`; ``paper`` is the
published configuration (the defaults). Sets:

* ``inter-subject``: abdomen_ct <-> chest_abdomen_ct, both directions, as in
  ``bench_intersubject.py`` (its :func:`intersubject_case.make_case` and
  :func:`intersubject_case.score`: Dice on the organs both scans contain, on the voxels the
  method maps inside the moving scan). Our affine is computed once per direction and reused by
  every variant (:func:`voxelopt.pipeline.register_volumes` with ``matrix=``).
* ``tuning``: synthetic pairs of the ``--cts`` scans on their auto working grids
  (``voxelopt.phantom.make_pair``: the CT warped by a known smooth field, ``--max-disp`` mm,
  with intensity bias and noise; MIND extracted once per pair) for ``--tune-seeds``.
* ``held-out``: the same for ``--held-out-seeds``, run only for ``paper`` and the variants
  chosen on the other two sets, after the choice; nothing is tuned on them.

Choice (fixed before any run): the gain of a variant is its mean Dice minus ``paper``'s, on the
inter-subject pairs (mean of the directions) and on the tuning seeds; the ``--select`` variants
with the largest smaller-of-the-two gains go on to the held-out seeds. A variant *wins* when it
beats ``paper`` on the inter-subject pairs and on the held-out seeds.

Synthetic scoring: :func:`bench_ablation.score` (runtime: MIND of both images + solve).
``--tables-only`` rebuilds the tables from ``<out>/rows.json``; ``--write`` puts them into
BENCHMARKS.md (marked block ``bench_method_ablation``).
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_k, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# the helper modules sit beside this script (benchmarks/ is sys.path[0] when run as a script)
from bench_ablation import score as score_synthetic  # noqa: E402
from intersubject_case import DIRECTIONS, make_case  # noqa: E402
from intersubject_case import score as score_intersubject  # noqa: E402

from voxelopt import VoxelOpt, VoxelOptConfig  # noqa: E402
from voxelopt.affine import compose_affine_and_field  # noqa: E402
from voxelopt.ct import AIR_HU  # noqa: E402
from voxelopt.data import load_abdomen_ct  # noqa: E402
from voxelopt.features import build_extractor  # noqa: E402
from voxelopt.phantom import make_pair  # noqa: E402
from voxelopt.tables import format_number, markdown_table, write_marked_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BLOCK = "bench_method_ablation"
TITLE = "## Method ablation on real pairs (issue 12)"
_GAMMAS = VoxelOptConfig().gammas
#: variant name -> VoxelOptConfig fields changed from the published defaults
VARIANTS: dict[str, dict] = {
    "paper": {},
    "fixed sigma 0.5": {"adaptive": False, "fixed_sigma": 0.5},
    "fixed sigma 0.8": {"adaptive": False, "fixed_sigma": 0.8},
    "fixed sigma 1.0": {"adaptive": False, "fixed_sigma": 1.0},
    "adaptive [0.3, 1.0]": {"sigma_low": 0.3, "sigma_high": 1.0},
    "adaptive [0.5, 1.5]": {"sigma_low": 0.5, "sigma_high": 1.5},
    "levels 4": {"levels": 4},
    "smoothing 5": {"smoothing_iterations": 5},
    "gammas x0.5": {"gammas": tuple(0.5 * g for g in _GAMMAS)},
    "gammas x2": {"gammas": tuple(2.0 * g for g in _GAMMAS)},
    "kernel 2": {"kernel_size": 2},
}
SETS = ("inter-subject", "tuning", "held-out")
METRICS = ("dice", "hd95", "sdlogj", "runtime")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/method_ablation"), help="rows.json")
    p.add_argument(
        "--variants",
        nargs="+",
        default=[v for v in VARIANTS if v != "kernel 2"],
        choices=list(VARIANTS),
        metavar="NAME",
        help="variants to run ('paper' always runs): " + ", ".join(VARIANTS),
    )
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--held-out-seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument(
        "--cts",
        nargs="+",
        default=["abdomen_ct", "chest_abdomen_ct"],
        choices=["abdomen_ct", "chest_abdomen_ct"],
        help="shared scans the synthetic pairs are made of (each at its auto working grid)",
    )
    p.add_argument("--max-disp", type=float, default=15.0, help="synthetic field, largest mm")
    p.add_argument("--select", type=int, default=2, help="variants taken to the held-out seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tables-only", action="store_true", help="only rebuild from rows.json")
    p.add_argument(
        "--write",
        nargs="?",
        type=Path,
        const=ROOT / "BENCHMARKS.md",
        default=None,
        help="put the tables into this Markdown file (default BENCHMARKS.md)",
    )
    args = p.parse_args(argv)
    args.variants = ["paper"] + [v for v in args.variants if v != "paper"]
    args.command = "python benchmarks/bench_method_ablation.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    return args


def config_of(name: str) -> VoxelOptConfig:
    """The solver configuration of a variant of :data:`VARIANTS` (names checked by argparse)."""
    return VoxelOptConfig(**VARIANTS[name])


def _log(row: dict, started: float) -> None:
    print(
        f"[{time.perf_counter() - started:6.0f} s] {row['set']:13s} {row['case']:22s} "
        f"{row['variant']:20s} Dice {row['dice']:.2f} HD95 {row['hd95']:.1f} SDlogJ "
        f"{row['sdlogj']:.3f} runtime {row['runtime']:.1f} s",
        flush=True,
    )


def run_intersubject(variants: list[str], started: float) -> list[dict]:
    """Every variant on both inter-subject directions, our affine once per direction."""
    from voxelopt.pipeline import register_volumes

    rows = []
    for name in DIRECTIONS:
        case = make_case(name)
        for variant in [variants[0], *variants]:  # the first run warms up (numba, allocations)
            res = register_volumes(
                case.fixed,
                case.moving,
                extractor="mind",
                config=config_of(variant),
                spacing=case.spacing,
                matrix=case.matrix,
            )
            u = res.displacement_working
            total = compose_affine_and_field(case.matrix, u, case.grid.affine)
            own = score_intersubject(case, total, res.runtime_s)[0]["own"]
            row = {"set": "inter-subject", "case": name, "variant": variant}
            row |= {"dice": 100.0 * own["dice"], "hd95": own["hd95"]}
            row |= {"sdlogj": own["sdlogj_l2r"], "runtime": res.runtime_s}
            rows = [r for r in rows if (r["case"], r["variant"]) != (name, variant)] + [row]
            _log(row, started)
    return rows


def load_working_ct(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A shared CT and its labels on its automatic working grid
    (:func:`voxelopt.grid.working_spacing`; abdomen_ct keeps its own 3 mm grid).

    Returns:
        ``(hu, labels, spacing)``: ``(D, H, W)`` float32 HU and int64 labels, spacing in mm.
    """
    from voxelopt.grid import resample_to_grid, working_grid, working_spacing
    from voxelopt.io import load_labels, load_volume
    from voxelopt.paths import shared_dir

    if name == "abdomen_ct":
        ct, lab = load_abdomen_ct()
        return np.asarray(ct.data, np.float32), np.asarray(lab.data), tuple(ct.spacing)
    folder = shared_dir() / "data" / name
    ct, lab = load_volume(folder / "ct.nii.gz"), load_labels(folder / "labels_btcv13.nii.gz")
    grid = working_grid(ct, working_spacing(ct.shape, ct.spacing, "auto"))
    hu = np.asarray(resample_to_grid(ct, grid, 1, AIR_HU).data, np.float32)
    return hu, np.asarray(resample_to_grid(lab, grid, 0, 0).data), tuple(grid.spacing)


def run_synthetic(set_name: str, seeds: list[int], variants: list[str], args, started) -> list:
    """Every variant on the synthetic pairs of each ``--cts`` scan for ``seeds`` (MIND
    features extracted once per pair and reused by every variant)."""
    ex = build_extractor("mind").eval()
    solvers = {v: VoxelOpt(config_of(v)) for v in variants}
    rows = []
    for ct_name in args.cts:
        hu, lab, spacing = load_working_ct(ct_name)
        present = [k for k in range(1, 14) if bool((lab == k).any())]
        for seed in seeds:
            pair = make_pair(hu, lab, args.max_disp, spacing, seed=seed)
            case = f"{ct_name} seed {seed}"
            rows += _solve_pair(pair, present, case, set_name, ex, solvers, started)
    return rows


def _solve_pair(pair, present, case: str, set_name: str, ex, solvers: dict, started) -> list:
    """Every solver on one synthetic pair, features extracted once (timed into runtime)."""
    body = pair.fixed_hu > -500
    with torch.inference_mode():
        t0 = time.perf_counter()
        f, m = ex.prepare_pair(ex(pair.fixed_hu), ex(pair.moving_hu))
        t_feat = time.perf_counter() - t0
        next(iter(solvers.values())).solve(f, m)  # warm-up
    rows = []
    for variant, solver in solvers.items():
        with torch.inference_mode():
            t0 = time.perf_counter()
            disp = solver.solve(f, m).displacement
            runtime = t_feat + time.perf_counter() - t0
        sc = score_synthetic(disp, pair, present, body, runtime)
        row = {"set": set_name, "case": case, "variant": variant}
        row |= {k: sc[k] for k in METRICS}
        rows.append(row)
        _log(row, started)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {variant: {metric: mean over the set's cases}}}``."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault(r["set"], {}).setdefault(r["variant"], {m: [] for m in METRICS})
        for m in METRICS:
            if r[m] is not None and np.isfinite(r[m]):
                cell[m].append(r[m])
    return {
        s: {v: {m: statistics.fmean(x) if x else None for m, x in c.items()} for v, c in d.items()}
        for s, d in out.items()
    }


def gains(summary: dict, set_name: str) -> dict[str, float]:
    """Mean Dice of each variant minus ``paper``'s on one set (points)."""
    d = summary.get(set_name, {})
    if "paper" not in d:
        return {}
    return {v: s["dice"] - d["paper"]["dice"] for v, s in d.items()}


def choose(summary: dict, select: int) -> list[str]:
    """The ``select`` variants with the largest min(inter-subject gain, tuning gain)."""
    gi, gt = gains(summary, "inter-subject"), gains(summary, "tuning")
    both = {v: min(gi[v], gt[v]) for v in gi if v in gt and v != "paper"}
    return sorted(both, key=both.get, reverse=True)[:select]


def _fmt(value, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else format_number(value, digits, "f")


def summary_table(rows: list[dict], summary: dict, chosen: list[str]) -> str:
    """One line per variant: Dice per direction, inter-subject mean and gain, tuning and
    held-out Dice and gain, HD95 / SDlogJ / runtime (inter-subject | tuning)."""
    per_dir = {(r["case"], r["variant"]): r["dice"] for r in rows if r["set"] == "inter-subject"}
    g = {s: gains(summary, s) for s in SETS}
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        s = {k: summary.get(k, {}).get(v, {}) for k in SETS}
        line = {"variant": v + (" (chosen)" if v in chosen else "")}
        for name in DIRECTIONS:
            line[f"Dice {name} (%)"] = _fmt(per_dir.get((name, v)))
        for k in SETS:
            line[f"Dice {k} (%)"] = _fmt(s[k].get("dice"))
            line[f"gain {k}"] = _fmt(g[k].get(v), 1, True)
        for m, digits in (("hd95", 1), ("sdlogj", 3), ("runtime", 1)):
            vals = [_fmt(s[k].get(m), digits) for k in ("inter-subject", "tuning")]
            line[f"{m} inter / tuning"] = " / ".join(vals)
        out.append(line)
    return markdown_table(out, fmt=str)


def case_table(rows: list[dict]) -> str:
    """Dice (%) of every variant on every case (direction or synthetic pair), set by set."""
    cases = list(dict.fromkeys((r["set"], r["case"]) for r in rows))
    dice = {(r["set"], r["case"], r["variant"]): r["dice"] for r in rows}
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        line = {"variant": v}
        for st, case in cases:
            line[f"{st}: {case}"] = _fmt(dice.get((st, case, v)))
        out.append(line)
    return markdown_table(out, fmt=str)


def verdict(summary: dict, chosen: list[str]) -> list[str]:
    """One line per chosen variant: does it beat ``paper`` on inter-subject and held-out?"""
    gi, gh = gains(summary, "inter-subject"), gains(summary, "held-out")
    lines = []
    for v in chosen:
        wins = gi.get(v, -1) > 0 and gh.get(v, -1) > 0
        lines.append(
            f"- `{v}`: {gi.get(v, float('nan')):+.2f} Dice points on the inter-subject pairs, "
            f"{gh.get(v, float('nan')):+.2f} on the held-out seeds: "
            + ("beats `paper` on both." if wins else "does not beat `paper` on both.")
        )
    return lines


def not_helping(summary: dict) -> list[str]:
    """One line per variant that does not beat ``paper`` on the inter-subject pairs or on the
    tuning seeds, with both gains."""
    gi, gt = gains(summary, "inter-subject"), gains(summary, "tuning")
    return [
        f"- `{v}`: {gi[v]:+.2f} inter-subject, {gt[v]:+.2f} tuning"
        for v in gi
        if v != "paper" and v in gt and min(gi[v], gt[v]) <= 0
    ]


def report(rows: list[dict], chosen: list[str], args: argparse.Namespace) -> str:
    """The Markdown block: setup, the table, the choice and its verdict, the command."""
    summary = summarise(rows)
    cases = {s: sorted({r["case"] for r in rows if r["set"] == s}) for s in SETS}
    head = [
        TITLE,
        "",
        "Written by `benchmarks/bench_method_ablation.py` with `--write` from the rows of the "
        "command below.",
        "",
        "MIND features, hard argmin, 1 thread (2 shared cores, another job running: runtimes "
        "are comparable within a column only). Variants change fields of `VoxelOptConfig`; "
        "`paper` is the published configuration (the defaults): "
        + "; ".join(
            f"`{k}` = {v}"
            for k, v in VARIANTS.items()
            if k != "paper" and k in {r["variant"] for r in rows}
        )
        + ". Inter-subject: "
        + ", ".join(cases["inter-subject"])
        + " (our affine once per direction, scored as in the inter-subject benchmark, own "
        "FOV). Synthetic: the shared CTs on their auto working grids (abdomen_ct 3 mm, "
        "chest_abdomen_ct about 2.6 mm) warped by a known smooth field of at most "
        f"{args.max_disp:g} mm with intensity bias and noise; tuning: "
        + ", ".join(cases["tuning"])
        + "; held-out: "
        + (", ".join(cases["held-out"]) or "not run")
        + ". HD95 in mm, SDlogJ the Learn2Reg variant, runtime in s (features + solve). "
        "Gains: mean Dice minus `paper`'s (points).",
        "",
        "Choice, fixed before the runs and made without the held-out seeds: the "
        f"{args.select} variants with the largest smaller-of-the-two gains on the "
        "inter-subject pairs and the tuning seeds; only they (and `paper`) ran on the held-out "
        "seeds.",
        "",
    ]
    tail = ["", "Dice (%) per case:", "", case_table(rows)]
    tail += ["Chosen variants on the held-out seeds:", "", *verdict(summary, chosen)]
    lost = not_helping(summary)
    if lost:
        tail += [
            "",
            "Did not beat `paper` on the inter-subject pairs or the tuning seeds (Dice points):",
            "",
            *lost,
        ]
    tail += ["", "Command:", "", "```", args.command, "```"]
    return "\n".join(head) + "\n" + summary_table(rows, summary, chosen) + "\n".join(tail) + "\n"


def _save(path: Path, rows: list[dict], chosen: list[str], command: str) -> None:
    path.write_text(json.dumps({"rows": rows, "chosen": chosen, "command": command}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run the sets (or reload them), choose, run the held-out seeds, print and write."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path, started = args.out / "rows.json", time.perf_counter()
    if args.tables_only:
        saved = json.loads(path.read_text())
        rows, chosen, args.command = saved["rows"], saved["chosen"], saved["command"]
    else:
        rows = run_synthetic("tuning", args.tune_seeds, args.variants, args, started)
        _save(path, rows, [], args.command)
        rows += run_intersubject(args.variants, started)
        chosen = choose(summarise(rows), args.select)
        print(f"chosen for the held-out seeds: {chosen}", flush=True)
        _save(path, rows, chosen, args.command)
        rows += run_synthetic("held-out", args.held_out_seeds, ["paper", *chosen], args, started)
        _save(path, rows, chosen, args.command)
    block = report(rows, chosen, args)
    print(block)
    if args.write is not None:
        print(f"wrote {write_marked_block(args.write, BLOCK, block)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
