"""Feature and message-passing ablation of VoxelOpt (paper Table 2) on the real-CT pairs.

Pairs: the shared abdominal CT (``voxelopt.phantom.load_abdomen_ct``, 122 x 101 x 112 at 3 mm)
warped by known smooth fields (``voxelopt.phantom.make_pair``: diffeomorphic, 40 mm control
spacing, largest displacement ``--max-disp`` mm, smooth intensity bias and noise on the moving
image), one pair per seed and setting. VoxelOpt runs zero-shot at the CT's own resolution with
the published defaults (5 levels, k = 1, beta = 0.1, reference sigma map, cost pre-filter) on
raw, MIND-SSC and OBELISK features, each with the entropy-adaptive message passing on and off
(``adaptive=False``: fixed Gaussian, sigma 0.5). Features are extracted once per image (and
jointly normalised with ``normalize_pair`` where the extractor asks for it) and reused for both
solver settings.

Scores per pair, then mean +- std over the pairs of a setting: Dice over the 12 organs present
(13-organ labels; esophagus is absent from this scan), HD95 (mm), SDlogJ (Learn2Reg variant),
% non-positive Jacobian determinants, endpoint error against the true field (mm, inside the
body, ``fixed_hu > -500``), and runtime (feature extraction of both images + solver, 1 thread).

``--diagnostics`` adds clearly labelled extra rows (not the published defaults), a PNG of the
finest-level entropy and sigma maps of MIND and OBELISK on the first pair, and a table of
cost-volume statistics that explain the OBELISK result (see docs/results_ablation.md).

Usage:
    python benchmarks/bench_ablation.py --diagnostics          # writes docs/results_ablation.md
    python benchmarks/bench_ablation.py --seeds 0 --max-disp 15 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from voxelopt import VoxelOpt, VoxelOptConfig  # noqa: E402
from voxelopt.cost import cost_volume  # noqa: E402
from voxelopt.entropy import displacement_entropy  # noqa: E402
from voxelopt.features import build_extractor, normalize_pair  # noqa: E402
from voxelopt.features.obelisk import ObeliskFeatures  # noqa: E402
from voxelopt.filtering import side_weight  # noqa: E402
from voxelopt.metrics import (  # noqa: E402
    BTCV13_LABELS,
    dice,
    endpoint_error,
    hd95,
    mean_over_labels,
    nonpositive_jacobian_fraction,
    sdlogj,
)
from voxelopt.phantom import load_abdomen_ct, make_pair  # noqa: E402
from voxelopt.transform import warp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN = "<!-- bench_ablation:begin -->"
MARK_END = "<!-- bench_ablation:end -->"
DEFAULT_OUT = ROOT / "docs" / "results_ablation.md"
DEFAULT_FIGURE = ROOT / "docs" / "figures" / "ablation_entropy_mind_obelisk.png"
METRICS = ("dice", "hd95", "sdlogj", "nonpos_pct", "epe", "runtime")
# feature keys -> (registry name, extractor kwargs); "obelisk_auto" is a diagnostic variant
# (the organ crop, best for segmentation, which was the extractor's default before this table)
EXTRACTOR_SPECS = {
    "raw": ("raw", {}),
    "mind": ("mind", {}),
    "obelisk": ("obelisk", {}),
    "obelisk_auto": ("obelisk", {"crop": "auto"}),
}
ORGAN_ROWS = ("initial (identity)", "mind, adaptive", "obelisk, adaptive")


@dataclass
class Variant:
    """One row of the table: an extractor, the solver config and how features are prepared."""

    name: str
    features: str
    config: VoxelOptConfig
    normalize: bool = True  # apply normalize_pair when the extractor asks for it
    diagnostic: bool = False


def headline_variants(features: list[str]) -> list[Variant]:
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


@dataclass
class Rows:
    """Per-variant lists of per-pair scores for one setting."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    organs: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def add(self, name: str, scores: dict) -> None:
        row = self.values.setdefault(name, {m: [] for m in METRICS})
        for m in METRICS:
            row[m].append(scores[m])
        per = self.organs.setdefault(name, {})
        for k, v in scores["dice_per_label"].items():
            per.setdefault(k, []).append(100.0 * v)


def score(
    disp: torch.Tensor, pair, present: list[int], body: torch.Tensor, runtime: float
) -> dict[str, float]:
    """The table's metrics for one displacement ``(1, 3, D, H, W)`` (voxels)."""
    moved = warp(pair.moving_labels, disp, mode="nearest")[0, 0]
    fixed = pair.fixed_labels[0, 0]
    d = dice(moved, fixed, present)
    h = hd95(moved, fixed, pair.spacing, present)
    disp64 = disp.double()
    return {
        "dice": 100.0 * float(mean_over_labels(d)),
        "hd95": float(mean_over_labels(h)),
        "sdlogj": float(sdlogj(disp64, "l2r")[0]),
        "nonpos_pct": 100.0 * float(nonpositive_jacobian_fraction(disp64)[0]),
        "epe": float(endpoint_error(disp, pair.displacement, pair.spacing, body)[0]),
        "runtime": runtime,
        "dice_per_label": d,
    }


def cost_stats(fixed: torch.Tensor, moving: torch.Tensor, beta: float, body: torch.Tensor) -> dict:
    """How decisive the finest-level cost volume is: the quantities behind the entropy.

    On the pair at full resolution with the moving features warped by the true field (the
    finest level's situation once the coarser levels are right): the median over body voxels
    of the gap between the second-best and the best of the 27 costs, of the spread
    (max - min) of the 27 costs, both also divided by ``beta``, and the median normalised
    entropy ``E / log 27``; plus the fraction of body voxels whose 27 costs are all within
    ``beta / 10`` of each other (a flat, uninformative cost).
    """
    cost = cost_volume(fixed, moving, 1)[0]  # (27, D, H, W)
    mask = body[0, 0]
    c = cost[:, mask]  # (27, N)
    srt = c.sort(dim=0).values
    gap = srt[1] - srt[0]
    spread = srt[-1] - srt[0]
    ent = displacement_entropy(cost[None], beta)[0, 0][mask] / float(np.log(27))
    return {
        "gap": float(gap.median()),
        "gap_beta": float(gap.median()) / beta,
        "spread": float(spread.median()),
        "spread_beta": float(spread.median()) / beta,
        "entropy": float(ent.median()),
        "flat_pct": 100.0 * float((spread < beta / 10).double().mean()),
    }


def fmt(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(rows: Rows, order: list[str]) -> str:
    head = (
        "| method | Dice % | HD95 mm | SDlogJ | % J <= 0 | EPE mm (body) | runtime s |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    digits = {"dice": 2, "hd95": 2, "sdlogj": 3, "nonpos_pct": 3, "epe": 2, "runtime": 1}
    for name in order:
        if name not in rows.values:
            continue
        r = rows.values[name]
        cells = [fmt(r[m], digits[m]) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_entropy_figure(
    path: Path,
    fixed_hu: torch.Tensor,
    fixed_labels: torch.Tensor,
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Coronal slice through the organs' centre: fixed CT, finest-level entropy and sigma."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axis = 1
    index = int(torch.nonzero(fixed_labels[0, 0] > 0)[:, axis].float().mean().round())

    def sl(v: torch.Tensor) -> np.ndarray:
        return np.take(v[0, 0].float().numpy(), index, axis=axis).T

    ncol = 1 + 2 * len(maps)
    fig = Figure(figsize=(3.0 * ncol, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, ncol, 1)
    ax.imshow(sl(fixed_hu), cmap="gray", vmin=-500, vmax=800, origin="lower")
    ax.contour(
        sl(fixed_labels.float()) > 0, levels=[0.5], colors="c", linewidths=0.5, origin="lower"
    )
    ax.set_title(f"fixed CT, coronal {index}")
    ax.axis("off")
    col = 2
    for name, (ent, sig) in maps.items():
        e = ent / float(np.log(27))
        ax = fig.add_subplot(1, ncol, col)
        im = ax.imshow(sl(e), cmap="magma", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"{name}: entropy / log 27")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax = fig.add_subplot(1, ncol, col + 1)
        im = ax.imshow(sl(sig), cmap="viridis", vmin=0.1, vmax=0.5, origin="lower")
        ax.set_title(f"{name}: sigma (voxels)")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
        col += 2
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


def obelisk_box_stats(
    extractor: ObeliskFeatures,
    hu: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    body: torch.Tensor,
    disp: torch.Tensor,
    true_disp: torch.Tensor,
    spacing,
) -> dict:
    """Where the OBELISK crop lies, how well its logits segment, and the EPE inside/outside it."""
    box = extractor.box_for(hu)
    inside = torch.zeros_like(body)
    (d0, d1), (h0, h1), (w0, w1) = box
    inside[..., d0:d1, h0:h1, w0:w1] = True
    # argmax of the raw logits against the labels, on the organs OBELISK has a class for
    btcv_to_obelisk = {1: 1, 3: 3, 4: 4, 6: 6, 7: 7, 11: 2}
    pred = logits[0].argmax(0)
    seg = {}
    for b, o in btcv_to_obelisk.items():
        t, q = labels[0, 0] == b, pred == o
        seg[b] = 2.0 * float((t & q).sum()) / max(1, int(t.sum() + q.sum()))
    organ = labels > 0
    return {
        "box": box,
        "body_in_box_pct": 100.0 * float((body & inside).sum()) / float(body.sum()),
        "organs_in_box_pct": 100.0 * float((organ & inside).sum()) / max(1, int(organ.sum())),
        "epe_in": float(endpoint_error(disp, true_disp, spacing, body & inside)[0]),
        "epe_out": float(endpoint_error(disp, true_disp, spacing, body & ~inside)[0]),
        "dice_argmax": seg,
    }


def smoothing_strength(levels) -> list[float]:
    """Per level (finest first): mean side weight of the adaptive filter / that of sigma 0.5.

    The 3-tap kernel's neighbour weight is what the message passing actually mixes in; 1.0
    means as much smoothing as the non-adaptive ablation (fixed sigma 0.5).
    """
    ref = side_weight(0.5)
    return [float(side_weight(lv.sigma).mean()) / ref for lv in levels]


def write_markdown(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# VoxelOpt ablation on the real-CT pairs\n\n"
    if MARK_BEGIN in text and MARK_END in text:
        pre, rest = text.split(MARK_BEGIN, 1)
        post = rest.split(MARK_END, 1)[1]
        text = pre + MARK_BEGIN + "\n" + block + "\n" + MARK_END + post
    else:
        text = text.rstrip() + "\n\n" + MARK_BEGIN + "\n" + block + "\n" + MARK_END + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_ablation.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    started = time.perf_counter()

    ct, lab = load_abdomen_ct()
    present = [k for k in range(1, 14) if bool((lab.data == k).any())]
    headline = headline_variants(args.features)
    diagnostic = diagnostic_variants(args.features) if args.diagnostics else []
    keys = {v.features for v in headline + diagnostic}
    extractors = {
        k: build_extractor(EXTRACTOR_SPECS[k][0], **EXTRACTOR_SPECS[k][1]).eval()
        for k in EXTRACTOR_SPECS
        if k in keys
    }
    solvers = {v.name: VoxelOpt(v.config) for v in headline + diagnostic}

    results: dict[float, Rows] = {}
    feature_time: dict[str, list[float]] = {}
    stats_rows: dict[str, list[dict]] = {}
    box_rows: list[dict] = []
    smooth_rows: dict[str, list[list[float]]] = {}
    figure_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    first_pair = None
    for setting, disp_mm in enumerate(args.max_disp):
        rows = results.setdefault(disp_mm, Rows())
        diag = args.diagnostics and setting == 0
        variants = headline + (diagnostic if diag else [])
        for seed in args.seeds:
            pair = make_pair(ct.data, lab.data, disp_mm, ct.spacing, seed=seed)
            body = pair.fixed_hu > -500
            zero = torch.zeros_like(pair.displacement)
            rows.add("initial (identity)", score(zero, pair, present, body, 0.0))
            for key, ex in extractors.items():
                todo = [v for v in variants if v.features == key]
                if not todo:
                    continue
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    f_raw, m_raw = ex(pair.fixed_hu), ex(pair.moving_hu)
                    t_feat = time.perf_counter() - t0
                    feature_time.setdefault(key, []).append(t_feat)
                    f_n, m_n = f_raw, m_raw
                    if ex.pair_normalize:
                        t0 = time.perf_counter()
                        f_n, m_n = normalize_pair(f_raw, m_raw)
                        t_feat += time.perf_counter() - t0
                for v in todo:
                    f, m = (f_n, m_n) if v.normalize else (f_raw, m_raw)
                    with torch.inference_mode():
                        t0 = time.perf_counter()
                        res = solvers[v.name].solve(f, m)
                        t_solve = time.perf_counter() - t0
                    sc = score(res.displacement, pair, present, body, t_feat + t_solve)
                    rows.add(v.name, sc)
                    print(
                        f"[{time.perf_counter() - started:6.0f} s] {disp_mm:g} mm seed {seed} "
                        f"{v.name}: Dice {sc['dice']:.2f} EPE {sc['epe']:.2f} "
                        f"solve {t_solve:.1f} s",
                        flush=True,
                    )
                    if not diag or v.diagnostic or not v.config.adaptive:
                        continue
                    smooth_rows.setdefault(key, []).append(smoothing_strength(res.levels))
                    if first_pair is None and key in ("mind", "obelisk"):
                        figure_maps[key] = (res.levels[0].entropy, res.levels[0].sigma)
                    if key == "obelisk":
                        with torch.inference_mode():
                            box_rows.append(
                                obelisk_box_stats(
                                    ex,
                                    pair.fixed_hu,
                                    f_raw,
                                    pair.fixed_labels,
                                    body,
                                    res.displacement,
                                    pair.displacement,
                                    pair.spacing,
                                )
                            )
                if diag and key in ("raw", "mind", "obelisk"):
                    pairs = [("normalised", f_n, m_n)] if ex.pair_normalize else [("", f_n, m_n)]
                    if ex.pair_normalize:
                        pairs.append(("raw logits, not normalised", f_raw, m_raw))
                    for label, f, m in pairs:
                        name = f"{key} ({label})" if label else key
                        with torch.inference_mode():
                            aligned = warp(m, pair.displacement)  # moving at the true alignment
                            stats_rows.setdefault(name, []).append(
                                cost_stats(f, aligned, 0.1, body)
                            )
            if diag and first_pair is None:
                first_pair = (disp_mm, seed)
                if figure_maps:
                    save_entropy_figure(args.figure, pair.fixed_hu, pair.fixed_labels, figure_maps)

    order = ["initial (identity)"] + [v.name for v in headline + diagnostic]
    total = time.perf_counter() - started
    parts = [
        f"Command: `OMP_NUM_THREADS=1 {command}`  ",
        f"Machine: {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; total {total / 60:.1f} min.  ",
        f"Pairs: shared CT {tuple(ct.data.shape)} at {ct.spacing[0]:g} mm, seeds {args.seeds} "
        f"for each setting, intensity change on; {len(present)} organs scored. Mean ± std over "
        "the pairs of a setting. Runtime = feature extraction of both images (+ pair "
        "normalisation) + solver, CPU, 1 thread. Rows marked [diag] are diagnostics, not the "
        "published defaults" + (" (first setting only)." if args.diagnostics else "."),
    ]
    for disp_mm, rows in results.items():
        parts.append(f"\n### Largest true displacement {disp_mm:g} mm\n")
        parts.append(table(rows, order))
    parts.append(
        "\nFeature extraction of both images (s, mean): "
        + ", ".join(f"{k} {statistics.fmean(v):.1f}" for k, v in feature_time.items())
    )
    first = results[args.max_disp[0]]
    organ_rows = [r for r in ORGAN_ROWS if r in first.organs]
    if args.diagnostics:
        organ_rows += [v.name for v in diagnostic if v.features == "obelisk_auto"]
    if len(organ_rows) > 1:
        parts.append(f"\n### Dice % per organ, {args.max_disp[0]:g} mm pairs (mean)\n")
        parts.append("| method | " + " | ".join(BTCV13_LABELS[k] for k in present) + " |")
        parts.append("| --- |" + " --- |" * len(present))
        for r in organ_rows:
            cells = [f"{statistics.fmean(first.organs[r][k]):.1f}" for k in present]
            parts.append(f"| {r} | " + " | ".join(cells) + " |")
    if stats_rows:
        parts.append(
            "\n### Diagnostics: finest-level cost volume at the true alignment (body voxels)\n"
        )
        parts.append(
            "Fixed features against the moving features warped by the true field, full "
            "resolution. Median over body voxels (mean over pairs) of the gap between the best "
            "and second-best of the 27 costs and of their spread (max - min), also in units of "
            "beta = 0.1; median entropy E / log 27 at beta = 0.1; % of body voxels whose 27 "
            "costs lie within beta / 10 of each other (softmax nearly uniform).\n"
        )
        parts.append(
            "| features | gap | gap / beta | spread | spread / beta | median E / log 27 | "
            "% flat |\n| --- | --- | --- | --- | --- | --- | --- |"
        )
        for key, lst in stats_rows.items():
            avg = {k: statistics.fmean(d[k] for d in lst) for k in lst[0]}
            parts.append(
                f"| {key} | {avg['gap']:.4f} | {avg['gap_beta']:.3f} | {avg['spread']:.4f} | "
                f"{avg['spread_beta']:.3f} | {avg['entropy']:.3f} | {avg['flat_pct']:.1f} |"
            )
    if smooth_rows:
        nlev = len(next(iter(smooth_rows.values()))[0])
        parts.append(
            "\n### Diagnostics: smoothing of the adaptive filter relative to the non-adaptive one\n"
        )
        parts.append(
            "Mean over voxels of the 3-tap neighbour weight w1(sigma(x)) divided by w1(0.5) "
            "(the fixed filter of adaptive=False), per level, mean over pairs. 1.0 = as much "
            "smoothing as the non-adaptive ablation; the adaptive sigma is never above 0.5.\n"
        )
        parts.append(
            "| features | "
            + " | ".join(f"level {i}" for i in range(nlev))
            + " |\n| --- |"
            + " --- |" * nlev
        )
        for key, lst in smooth_rows.items():
            cells = [f"{statistics.fmean(x[i] for x in lst):.2f}" for i in range(nlev)]
            parts.append(f"| {key} | " + " | ".join(cells) + " |")
    if box_rows:
        b = box_rows[0]
        dices = {
            k: statistics.fmean(r["dice_argmax"][k] for r in box_rows) for k in b["dice_argmax"]
        }
        parts.append(
            "\n### Diagnostics: the OBELISK crop (fixed images, adaptive defaults)\n\n"
            f"Crop box of the first pair {b['box']} (voxels, D/H/W; W = inferior->superior, of "
            f"{tuple(ct.data.shape)}). Body voxels inside the box "
            f"{statistics.fmean(r['body_in_box_pct'] for r in box_rows):.1f} %, organ voxels "
            f"{statistics.fmean(r['organs_in_box_pct'] for r in box_rows):.1f} %. EPE (mm) inside "
            f"the box {statistics.fmean(r['epe_in'] for r in box_rows):.2f}, in the body outside "
            f"it {statistics.fmean(r['epe_out'] for r in box_rows):.2f}. Dice of the logits' "
            "argmax against the fixed labels: "
            + ", ".join(f"{BTCV13_LABELS[k]} {v:.2f}" for k, v in dices.items())
            + "."
        )
    if figure_maps and first_pair is not None:
        rel = os.path.relpath(args.figure, args.out.parent)
        parts.append(
            f"\nFigure (finest-level entropy and sigma, pair {first_pair[0]:g} mm seed "
            f"{first_pair[1]}, adaptive defaults): ![entropy and sigma]({rel})"
        )
    block = "\n".join(parts)
    print(block)
    if not args.no_write:
        write_markdown(args.out, block)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
