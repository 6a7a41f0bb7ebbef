"""Feature and message-passing ablation of VoxelOpt (paper Table 2) on the real-CT pairs.

Pairs: the shared abdominal CT (``voxelopt.phantom.load_abdomen_ct``, 122 x 101 x 112 at 3 mm)
warped by known smooth fields (``voxelopt.phantom.make_pair``: diffeomorphic, 40 mm control
spacing, largest displacement ``--max-disp`` mm, smooth intensity bias and noise on the moving
image), one pair per seed and setting. VoxelOpt runs zero-shot at the CT's own resolution with
the published defaults (5 levels, k = 1, beta = 0.1, reference sigma map, cost pre-filter) on
raw, MIND-SSC and OBELISK features, each with the entropy-adaptive message passing on and off
(``adaptive=False``: fixed Gaussian, sigma 0.5). Features are extracted once per image (and
prepared with the extractor's ``prepare_pair``: joint normalisation where it asks for it) and
reused for both solver settings.

Scores per pair, then mean +- std over the pairs of a setting: Dice over the 12 organs present
(13-organ labels; esophagus is absent from this scan), HD95 (mm), SDlogJ (Learn2Reg variant),
% non-positive Jacobian determinants, endpoint error against the true field (mm, inside the
body, ``fixed_hu > -500``), and runtime (feature extraction of both images + solver, 1 thread).

``--diagnostics`` adds clearly labelled extra rows (not the published defaults), a PNG of the
finest-level entropy and sigma maps of MIND and OBELISK on the first pair, and a table of
cost-volume statistics that explain the OBELISK result (see docs/results_ablation.md).

The report (tables and prose) is built by ``ablation_report.py``, the diagnostic measurements
and the figure by ``ablation_diagnostics.py``, both beside this script.

Usage:
    python benchmarks/bench_ablation.py --diagnostics          # writes docs/results_ablation.md
    python benchmarks/bench_ablation.py --seeds 0 --max-disp 15 --no-write
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# the helper modules sit beside this script (benchmarks/ is sys.path[0] when run as a script)
from ablation_diagnostics import (  # noqa: E402
    cost_stats,
    obelisk_box_stats,
    save_entropy_figure,
    smoothing_strength,
)
from ablation_report import (  # noqa: E402
    ORGAN_ROWS,
    Collected,
    ReportInfo,
    Rows,
    build_report,
    write_markdown,
)

from voxelopt import VoxelOpt, VoxelOptConfig  # noqa: E402
from voxelopt.data import load_abdomen_ct  # noqa: E402
from voxelopt.evaluation import score_registration  # noqa: E402
from voxelopt.features import build_extractor  # noqa: E402
from voxelopt.phantom import make_pair  # noqa: E402
from voxelopt.transform import warp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results_ablation.md"
DEFAULT_FIGURE = ROOT / "docs" / "figures" / "ablation_entropy_mind_obelisk.png"
# feature keys -> (registry name, extractor kwargs); "obelisk_auto" is a diagnostic variant
# (the organ crop, best for segmentation, which was the extractor's default before this table)
EXTRACTOR_SPECS = {
    "raw": ("raw", {}),
    "mind": ("mind", {}),
    "obelisk": ("obelisk", {}),
    "obelisk_auto": ("obelisk", {"crop": "auto"}),
}


@dataclass
class Variant:
    """One row of the table: an extractor, the solver config and how features are prepared."""

    name: str
    features: str
    config: VoxelOptConfig
    normalize: bool = True  # apply normalize_pair when the extractor asks for it
    diagnostic: bool = False


def headline_variants(features: list[str]) -> list[Variant]:
    """The published rows: each feature with the adaptive message passing on and off."""
    out = []
    for feat in features:
        out.append(Variant(f"{feat}, adaptive", feat, VoxelOptConfig()))
        out.append(Variant(f"{feat}, non-adaptive", feat, VoxelOptConfig(adaptive=False)))
    return out


def diagnostic_variants(features: list[str]) -> list[Variant]:
    """Extra rows that test the explanations of the OBELISK result (not published defaults)."""
    out = []
    if "obelisk" in features:
        out.append(
            Variant(
                "[diag] obelisk, adaptive, no pair normalisation (raw logits)",
                "obelisk",
                VoxelOptConfig(),
                normalize=False,
                diagnostic=True,
            )
        )
        out.append(
            Variant(
                "[diag] obelisk, adaptive, crop = auto (per-image organ box)",
                "obelisk_auto",
                VoxelOptConfig(),
                diagnostic=True,
            )
        )
        out.append(
            Variant(
                "[diag] obelisk, adaptive, beta = 0.01",
                "obelisk",
                VoxelOptConfig(beta=0.01),
                diagnostic=True,
            )
        )
    if "mind" in features:
        out.append(
            Variant(
                "[diag] mind, adaptive, beta = 0.01", "mind", VoxelOptConfig(beta=0.01), True, True
            )
        )
    return out


def score(
    disp: torch.Tensor, pair, present: list[int], body: torch.Tensor, runtime: float
) -> dict[str, float]:
    """The table's metrics for one displacement ``(1, 3, D, H, W)`` (voxels), in percent
    where the table shows percent; scored by :func:`voxelopt.evaluation.score_registration`."""
    s = score_registration(
        disp,
        spacing=pair.spacing,
        fixed_labels=pair.fixed_labels,
        moving_labels=pair.moving_labels,
        labels=present,
        true_displacement=pair.true_disp,
        mask=body,
        runtime_s=runtime,
    )
    return {
        "dice": 100.0 * s.dice_mean,
        "hd95": s.hd95_mean,
        "sdlogj": s.sdlogj_l2r,
        "nonpos_pct": 100.0 * s.nonpositive_jacobian,
        "epe": s.epe_mm,
        "runtime": runtime,
        "dice_per_label": s.dice,
    }


@dataclass
class Setup:
    """What every pair of the run shares."""

    present: list[int]  # BTCV-13 labels in the CT
    headline: list[Variant]
    diagnostic: list[Variant]  # empty without --diagnostics
    extractors: dict[str, torch.nn.Module]  # feature key -> extractor in eval mode
    solvers: dict[str, VoxelOpt]  # variant name -> solver
    figure: Path
    started: float  # time.perf_counter() at the start


@dataclass
class PairCase:
    """One registration pair of a setting and its scoring context."""

    pair: object  # voxelopt.phantom.Pair
    body: torch.Tensor  # (1, 1, D, H, W) bool, fixed_hu > -500
    disp_mm: float
    seed: int
    rows: Rows  # the setting's scores
    diag: bool  # record the diagnostics on this pair


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--max-disp", type=float, nargs="+", default=[15.0, 24.0])
    parser.add_argument("--features", nargs="+", default=["raw", "mind", "obelisk"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--diagnostics",
        action="store_true",
        help="extra rows, PNG and cost/crop statistics, on the pairs of the first --max-disp",
    )
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def make_setup(args: argparse.Namespace, labels: torch.Tensor, started: float) -> Setup:
    """Rows, extractors and solvers of the run; ``labels`` are the CT's BTCV-13 labels."""
    present = [k for k in range(1, 14) if bool((labels == k).any())]
    headline = headline_variants(args.features)
    diagnostic = diagnostic_variants(args.features) if args.diagnostics else []
    keys = {v.features for v in headline + diagnostic}
    extractors = {
        k: build_extractor(EXTRACTOR_SPECS[k][0], **EXTRACTOR_SPECS[k][1]).eval()
        for k in EXTRACTOR_SPECS
        if k in keys
    }
    solvers = {v.name: VoxelOpt(v.config) for v in headline + diagnostic}
    return Setup(present, headline, diagnostic, extractors, solvers, args.figure, started)


def extract(ex, case: PairCase, key: str, out: Collected) -> tuple:
    """Features of both images, raw and pair-normalised where the extractor asks for it.

    Returns:
        ``(f_raw, m_raw, f_n, m_n, t_feat)``: features ``(1, C, D, H, W)`` and the time (s)
        of the extraction plus the normalisation; the extraction alone goes to
        ``out.feature_time``.
    """
    pair = case.pair
    with torch.inference_mode():
        t0 = time.perf_counter()
        f_raw, m_raw = ex(pair.fixed_hu), ex(pair.moving_hu)
        t_feat = time.perf_counter() - t0
        out.feature_time.setdefault(key, []).append(t_feat)
        t0 = time.perf_counter()
        f_n, m_n = ex.prepare_pair(f_raw, m_raw)  # joint normalisation where it asks for it
        t_feat += time.perf_counter() - t0
    return f_raw, m_raw, f_n, m_n, t_feat


def solve_variant(v: Variant, f, m, t_feat: float, case: PairCase, setup: Setup):
    """Solve one row on one pair, score it into ``case.rows`` and print a progress line."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        res = setup.solvers[v.name].solve(f, m)
        t_solve = time.perf_counter() - t0
    sc = score(res.displacement, case.pair, setup.present, case.body, t_feat + t_solve)
    case.rows.add(v.name, sc)
    print(
        f"[{time.perf_counter() - setup.started:6.0f} s] {case.disp_mm:g} mm seed {case.seed} "
        f"{v.name}: Dice {sc['dice']:.2f} EPE {sc['epe']:.2f} "
        f"solve {t_solve:.1f} s",
        flush=True,
    )
    return res


def record_solution(key: str, ex, f_raw, res, case: PairCase, out: Collected) -> None:
    """Smoothing strength, figure maps and (OBELISK) crop statistics of an adaptive solution."""
    out.smooth_rows.setdefault(key, []).append(smoothing_strength(res.levels))
    if out.first_pair is None and key in ("mind", "obelisk"):
        out.figure_maps[key] = (res.levels[0].entropy, res.levels[0].sigma)
    if key == "obelisk":
        pair = case.pair
        with torch.inference_mode():
            out.box_rows.append(
                obelisk_box_stats(
                    ex,
                    pair.fixed_hu,
                    f_raw,
                    pair.fixed_labels,
                    case.body,
                    res.displacement,
                    pair.true_disp,
                    pair.spacing,
                )
            )


def record_cost_stats(key: str, ex, feats: tuple, case: PairCase, out: Collected) -> None:
    """:func:`cost_stats` at the true alignment, on the (normalised and raw) features."""
    f_raw, m_raw, f_n, m_n = feats
    pairs = [("normalised", f_n, m_n)] if ex.pair_normalize else [("", f_n, m_n)]
    if ex.pair_normalize:
        pairs.append(("raw logits, not normalised", f_raw, m_raw))
    for label, f, m in pairs:
        name = f"{key} ({label})" if label else key
        with torch.inference_mode():
            aligned = warp(m, case.pair.true_disp)  # moving at the true alignment
            out.stats_rows.setdefault(name, []).append(cost_stats(f, aligned, 0.1, case.body))


def measure_extractor(
    key: str, ex, todo: list[Variant], case: PairCase, setup: Setup, out: Collected
) -> None:
    """All rows of one extractor on one pair, features extracted once."""
    f_raw, m_raw, f_n, m_n, t_feat = extract(ex, case, key, out)
    for v in todo:
        f, m = (f_n, m_n) if v.normalize else (f_raw, m_raw)
        res = solve_variant(v, f, m, t_feat, case, setup)
        if case.diag and not v.diagnostic and v.config.adaptive:
            record_solution(key, ex, f_raw, res, case, out)
    if case.diag and key in ("raw", "mind", "obelisk"):
        record_cost_stats(key, ex, (f_raw, m_raw, f_n, m_n), case, out)


def measure_pair(case: PairCase, variants: list[Variant], setup: Setup, out: Collected) -> None:
    """The identity row and every variant on one pair; the figure after the first diag pair."""
    pair = case.pair
    zero = torch.zeros_like(pair.true_disp)
    case.rows.add("initial (identity)", score(zero, pair, setup.present, case.body, 0.0))
    for key, ex in setup.extractors.items():
        todo = [v for v in variants if v.features == key]
        if todo:
            measure_extractor(key, ex, todo, case, setup, out)
    if case.diag and out.first_pair is None:
        out.first_pair = (case.disp_mm, case.seed)
        if out.figure_maps:
            save_entropy_figure(setup.figure, pair.fixed_hu, pair.fixed_labels, out.figure_maps)


def run(args: argparse.Namespace, ct, lab, setup: Setup) -> Collected:
    """Every setting and seed; diagnostics on the pairs of the first setting."""
    out = Collected()
    for setting, disp_mm in enumerate(args.max_disp):
        rows = out.results.setdefault(disp_mm, Rows())
        diag = args.diagnostics and setting == 0
        variants = setup.headline + (setup.diagnostic if diag else [])
        for seed in args.seeds:
            pair = make_pair(ct.data, lab.data, disp_mm, ct.spacing, seed=seed)
            case = PairCase(pair, pair.fixed_hu > -500, disp_mm, seed, rows, diag)
            measure_pair(case, variants, setup, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the ablation, print the Markdown block and write it unless ``--no-write``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_ablation.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    started = time.perf_counter()
    ct, lab = load_abdomen_ct()
    setup = make_setup(args, lab.data, started)
    data = run(args, ct, lab, setup)

    organ_rows = [r for r in ORGAN_ROWS if r in data.results[args.max_disp[0]].organs]
    if args.diagnostics:
        organ_rows += [v.name for v in setup.diagnostic if v.features == "obelisk_auto"]
    info = ReportInfo(
        command=command,
        threads=args.threads,
        total_s=time.perf_counter() - started,
        shape=tuple(ct.data.shape),
        spacing_mm=ct.spacing[0],
        seeds=args.seeds,
        max_disp=args.max_disp,
        present=setup.present,
        order=["initial (identity)"] + [v.name for v in setup.headline + setup.diagnostic],
        organ_rows=organ_rows,
        diagnostics=args.diagnostics,
        figure=args.figure,
        out=args.out,
    )
    block = build_report(data, info)
    print(block)
    if not args.no_write:
        write_markdown(args.out, block)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
