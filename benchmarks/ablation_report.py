"""Result containers and the Markdown report of ``bench_ablation.py`` (paper Table 2).

The measuring loop of ``bench_ablation.py`` fills a :class:`Collected`; :func:`build_report`
turns it into the Markdown block that the benchmark prints and writes between the
``bench_ablation`` markers of docs/results_ablation.md. Sections: the header (command, machine,
pairs), one results table per displacement setting, the feature-extraction times, the Dice per
organ, and with ``--diagnostics`` the cost-volume statistics, the smoothing strength of the
adaptive filter, the OBELISK crop and the line linking the entropy/sigma figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from voxelopt.ct import BTCV13_LABELS
from voxelopt.tables import format_number, markdown_table, mean_std, write_marked_block

METRICS = ("dice", "hd95", "sdlogj", "nonpos_pct", "epe", "runtime")
# main table: column titles (method first, then one per METRICS entry) and decimals per metric
HEADERS = ["method", "Dice %", "HD95 mm", "SDlogJ", "% J <= 0", "EPE mm (body)", "runtime s"]
DIGITS = {"dice": 2, "hd95": 2, "sdlogj": 3, "nonpos_pct": 3, "epe": 2, "runtime": 1}
# cost-statistics table: key of :func:`ablation_diagnostics.cost_stats` -> (column title, decimals)
COST_COLUMNS = {
    "gap": ("gap", 4),
    "gap_beta": ("gap / beta", 3),
    "spread": ("spread", 4),
    "spread_beta": ("spread / beta", 3),
    "entropy": ("median E / log 27", 3),
    "flat_pct": ("% flat", 1),
}
ORGAN_ROWS = ("initial (identity)", "mind, adaptive", "obelisk, adaptive")


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


@dataclass
class Collected:
    """Everything the measuring loop gathers for the report.

    Attributes:
        results: per largest true displacement (mm), the per-pair scores of every row.
        feature_time: per feature key, feature extraction of both images (s), one per pair.
        stats_rows: per feature label, :func:`ablation_diagnostics.cost_stats` of each pair.
        box_rows: :func:`ablation_diagnostics.obelisk_box_stats` of each diagnostic pair.
        smooth_rows: per feature key, :func:`ablation_diagnostics.smoothing_strength` of each pair.
        figure_maps: per feature key, finest-level entropy and sigma ``(1, 1, D, H, W)`` of the
            first diagnostic pair.
        first_pair: ``(max_disp_mm, seed)`` of the first diagnostic pair, once it is done.
    """

    results: dict[float, Rows] = field(default_factory=dict)
    feature_time: dict[str, list[float]] = field(default_factory=dict)
    stats_rows: dict[str, list[dict]] = field(default_factory=dict)
    box_rows: list[dict] = field(default_factory=list)
    smooth_rows: dict[str, list[list[float]]] = field(default_factory=dict)
    figure_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    first_pair: tuple[float, int] | None = None


@dataclass
class ReportInfo:
    """What the report says about the run besides the scores."""

    command: str  # the benchmark's command line, without OMP_NUM_THREADS
    threads: int
    total_s: float  # wall time of the whole run
    shape: tuple[int, ...]  # the CT's (D, H, W)
    spacing_mm: float
    seeds: list[int]
    max_disp: list[float]
    present: list[int]  # BTCV-13 labels scored
    order: list[str]  # row names of the results tables, in order
    organ_rows: list[str]  # row names of the per-organ table
    diagnostics: bool
    figure: Path
    out: Path


def _mean_std0(values: list[float], digits: int) -> str:
    """``mean ± std`` with ``± 0`` for one value (the table's published format)."""
    text = mean_std(values, digits)
    return text if "±" in text or text == "-" else f"{text} ± {0:.{digits}f}"


def _fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals (``-`` for nan), as in the published tables."""
    return format_number(value, digits, "f")


def results_table(rows: Rows, order: list[str]) -> str:
    """The main table of one setting: mean ± std of every metric, one row per name in order."""
    lines = []
    for name in order:
        if name in rows.values:
            r = rows.values[name]
            cells = [name] + [_mean_std0(r[m], DIGITS[m]) for m in METRICS]
            lines.append(dict(zip(HEADERS, cells, strict=True)))
    return markdown_table(lines, HEADERS).rstrip()


def header_lines(info: ReportInfo) -> list[str]:
    """Command, machine and a description of the pairs and columns."""
    return [
        f"Command: `OMP_NUM_THREADS=1 {info.command}`  ",
        f"Machine: {platform.machine()}, {info.threads} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; total {info.total_s / 60:.1f} min.  ",
        f"Pairs: shared CT {info.shape} at {info.spacing_mm:g} mm, seeds {info.seeds} "
        f"for each setting, intensity change on; {len(info.present)} organs scored. Mean ± std "
        "over the pairs of a setting. Runtime = feature extraction of both images (+ pair "
        "normalisation) + solver, CPU, 1 thread. Rows marked [diag] are diagnostics, not the "
        "published defaults" + (" (first setting only)." if info.diagnostics else "."),
    ]


def feature_time_line(feature_time: dict[str, list[float]]) -> str:
    """Mean feature-extraction time (s, both images) per feature key."""
    return "\nFeature extraction of both images (s, mean): " + ", ".join(
        f"{k} {statistics.fmean(v):.1f}" for k, v in feature_time.items()
    )


def organ_section(rows: Rows, names: list[str], present: list[int], disp_mm: float) -> list[str]:
    """Mean Dice (%) per organ of the rows ``names`` on the pairs of one setting."""
    organs = [BTCV13_LABELS[k] for k in present]
    lines = [
        {
            "method": r,
            **{BTCV13_LABELS[k]: _fixed(statistics.fmean(rows.organs[r][k]), 1) for k in present},
        }
        for r in names
    ]
    return [
        f"\n### Dice % per organ, {disp_mm:g} mm pairs (mean)\n",
        markdown_table(lines, ["method", *organs]).rstrip(),
    ]


def cost_section(stats_rows: dict[str, list[dict]]) -> list[str]:
    """Statistics of the finest-level cost volume at the true alignment, mean over pairs."""
    lines = []
    for key, lst in stats_rows.items():
        avg = {k: statistics.fmean(d[k] for d in lst) for k in lst[0]}
        lines.append(
            {"features": key, **{k: _fixed(avg[k], d) for k, (_, d) in COST_COLUMNS.items()}}
        )
    headers = ["features"] + [title for title, _ in COST_COLUMNS.values()]
    return [
        "\n### Diagnostics: finest-level cost volume at the true alignment (body voxels)\n",
        "Fixed features against the moving features warped by the true field, full "
        "resolution. Median over body voxels (mean over pairs) of the gap between the best "
        "and second-best of the 27 costs and of their spread (max - min), also in units of "
        "beta = 0.1; median entropy E / log 27 at beta = 0.1; % of body voxels whose 27 "
        "costs lie within beta / 10 of each other (softmax nearly uniform).\n",
        markdown_table(lines, ["features", *COST_COLUMNS], headers).rstrip(),
    ]


def smoothing_section(smooth_rows: dict[str, list[list[float]]]) -> list[str]:
    """Per level, the adaptive filter's neighbour weight relative to sigma 0.5, mean over pairs."""
    nlev = len(next(iter(smooth_rows.values()))[0])
    levels = [f"level {i}" for i in range(nlev)]
    lines = [
        {
            "features": key,
            **{levels[i]: _fixed(statistics.fmean(x[i] for x in lst), 2) for i in range(nlev)},
        }
        for key, lst in smooth_rows.items()
    ]
    return [
        "\n### Diagnostics: smoothing of the adaptive filter relative to the non-adaptive one\n",
        "Mean over voxels of the 3-tap neighbour weight w1(sigma(x)) divided by w1(0.5) "
        "(the fixed filter of adaptive=False), per level, mean over pairs. 1.0 = as much "
        "smoothing as the non-adaptive ablation; the adaptive sigma is never above 0.5.\n",
        markdown_table(lines, ["features", *levels]).rstrip(),
    ]


def obelisk_crop_section(box_rows: list[dict], shape: tuple[int, ...]) -> str:
    """Where the OBELISK crop lies, EPE inside/outside it, Dice of the logits' argmax."""
    b = box_rows[0]
    dices = {k: statistics.fmean(r["dice_argmax"][k] for r in box_rows) for k in b["dice_argmax"]}

    def avg(key: str) -> float:
        return statistics.fmean(r[key] for r in box_rows)

    return (
        "\n### Diagnostics: the OBELISK crop (fixed images, adaptive defaults)\n\n"
        f"Crop box of the first pair {b['box']} (voxels, D/H/W; W = inferior->superior, of "
        f"{shape}). Body voxels inside the box {avg('body_in_box_pct'):.1f} %, organ voxels "
        f"{avg('organs_in_box_pct'):.1f} %. EPE (mm) inside the box {avg('epe_in'):.2f}, in the "
        f"body outside it {avg('epe_out'):.2f}. Dice of the logits' argmax against the fixed "
        "labels: " + ", ".join(f"{BTCV13_LABELS[k]} {v:.2f}" for k, v in dices.items()) + "."
    )


def figure_line(figure: Path, out: Path, first_pair: tuple[float, int]) -> str:
    """The Markdown link to the entropy/sigma figure, relative to the report file."""
    rel = os.path.relpath(figure, out.parent)
    return (
        f"\nFigure (finest-level entropy and sigma, pair {first_pair[0]:g} mm seed "
        f"{first_pair[1]}, adaptive defaults): ![entropy and sigma]({rel})"
    )


def build_report(data: Collected, info: ReportInfo) -> str:
    """The whole Markdown block: header, tables per setting and the diagnostics present."""
    parts = header_lines(info)
    for disp_mm, rows in data.results.items():
        parts.append(f"\n### Largest true displacement {disp_mm:g} mm\n")
        parts.append(results_table(rows, info.order))
    parts.append(feature_time_line(data.feature_time))
    if len(info.organ_rows) > 1:
        first = data.results[info.max_disp[0]]
        parts += organ_section(first, info.organ_rows, info.present, info.max_disp[0])
    if data.stats_rows:
        parts += cost_section(data.stats_rows)
    if data.smooth_rows:
        parts += smoothing_section(data.smooth_rows)
    if data.box_rows:
        parts.append(obelisk_crop_section(data.box_rows, info.shape))
    if data.figure_maps and data.first_pair is not None:
        parts.append(figure_line(info.figure, info.out, data.first_pair))
    return "\n".join(parts)


def write_markdown(path: Path, block: str) -> None:
    """Replace the ``bench_ablation`` block of the Markdown file ``path`` by ``block``."""
    write_marked_block(path, "bench_ablation", block, "# VoxelOpt ablation on the real-CT pairs")
