"""The comparison's outputs: the Markdown table, the per-pair CSV and the figure."""

from __future__ import annotations

import math
from pathlib import Path

from voxelopt.comparison.runner import ComparisonResult, MethodResult
from voxelopt.ct import BTCV13_LABELS
from voxelopt.tables import format_number, markdown_table, mean_std, write_csv, write_text

__all__ = ["comparison_table", "write_outputs"]


def comparison_table(result: ComparisonResult) -> str:
    """The comparison as Markdown: the table, then the skipped methods and their reasons."""
    headers = [
        "method",
        "type",
        "Dice (%)",
        "HD95 (mm)",
        "SDlogJ",
        "SDlogJ (plain)",
        "non-pos. J (%)",
        "EPE (mm)",
        "runtime median (s)",
        "device",
    ]
    rows = []
    for m in result.methods:
        if m.skipped:
            continue
        s, r = m.summary, m.rows
        rows.append(
            [
                m.label,
                m.kind,
                mean_std([x["dice"] for x in r], scale=100),
                mean_std([x["hd95"] for x in r]),
                format_number(s["sdlogj_l2r"], 3, "f"),
                format_number(s["sdlogj"], 3, "f"),
                format_number(s["nonpositive_jacobian"], 3, "f", 100),
                format_number(s["epe_mm"], 2, "f"),
                format_number(m.runtime_median, 2, "f"),
                m.device,
            ]
        )
    lines = [markdown_table([dict(zip(headers, r, strict=True)) for r in rows], headers).rstrip()]
    if not rows:
        lines = ["No method ran."]
    skipped = [m for m in result.methods if m.skipped]
    if skipped:
        lines += ["", "Skipped:"]
        lines += [f"- {m.label}: {m.skipped}" for m in skipped]
    return "\n".join(lines) + "\n"


def write_outputs(result: ComparisonResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.md``, ``pairs.csv`` and ``compare.png`` into ``output_dir``.

    Returns:
        ``{"markdown": path, "csv": path, "figure": path}`` (figure absent when no method ran).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"markdown": write_text(comparison_table(result), out / "compare.md")}
    ran = [m for m in result.methods if not m.skipped]
    rows = [{"method": m.key, **r} for m in ran for r in m.rows]
    if rows:
        paths["csv"] = write_csv(rows, out / "pairs.csv")
        paths["figure"] = _figure(result, ran, out / "compare.png")
    return paths


def _figure(result: ComparisonResult, ran: list[MethodResult], path: Path) -> Path:
    from voxelopt.visualize import save_comparison_figure

    first = result.pairs[0]
    moved = {m.label: m.first_moved.numpy() for m in ran}
    dice_per_organ = {
        m.label: {
            lab: [r[f"dice_{lab}"] for r in m.rows if not math.isnan(r[f"dice_{lab}"])]
            for lab in BTCV13_LABELS
        }
        for m in ran
    }
    return save_comparison_figure(
        path,
        first.fixed_hu[0, 0].numpy(),
        moved,
        dice_per_organ,
        label_names=BTCV13_LABELS,
        axis=1,
        spacing=first.spacing,
    )
