"""Result tables: the one writer of Markdown and CSV tables, and number formatting.

Every table of the project (the evaluation summary, per-pair CSVs, the comparison table, the
benchmarks' tables) is a list of rows, each a mapping ``{column: value}``; these functions turn
such rows into Markdown or CSV text and write it atomically. Numbers that are ``nan`` or
``None`` print as ``-``.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from voxelopt.io import atomic_output

__all__ = [
    "format_number",
    "markdown_table",
    "mean_std",
    "summary_rows",
    "write_csv",
    "write_marked_block",
    "write_text",
]

Row = Mapping[str, object]


def format_number(value, digits: int = 4, style: str = "g", scale: float = 1.0) -> str:
    """A number as table text: ``-`` for ``None``/``nan``, else ``value * scale`` formatted.

    Args:
        value: the number (non-numbers are printed with ``str``).
        digits: significant digits (``style="g"``) or decimals (``style="f"``).
        style: ``"g"`` or ``"f"``.
        scale: factor applied first (e.g. 100 for percent).
    """
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return "-"
        return f"{value * scale:.{digits}{style}}"
    return str(value)


def mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"mean ± std"`` of the finite values (sample std; just the mean for one value)."""
    finite = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{statistics.fmean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f}"


def markdown_table(
    rows: Sequence[Row],
    columns: Sequence[str] | None = None,
    headers: Sequence[str] | None = None,
    fmt: Callable[[object], str] = format_number,
) -> str:
    """Rows as a Markdown table.

    Args:
        rows: one mapping per row.
        columns: keys to show, in order (default: the first row's keys); missing ones print
            as ``-``.
        headers: column titles (default: the keys).
        fmt: how a cell value becomes text (default :func:`format_number`).

    Returns:
        The table, one line per row, ending in a newline.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to tabulate")
    columns = list(rows[0].keys()) if columns is None else list(columns)
    headers = columns if headers is None else list(headers)
    if len(headers) != len(columns):
        raise ValueError(f"got {len(headers)} headers for {len(columns)} columns")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary_rows(
    summaries: Mapping[str, Mapping[str, float]], columns: Sequence[str], name: str = "method"
) -> list[dict]:
    """``{method: {column: value}}`` as rows ``{name: method, column: value, ...}``."""
    return [{name: method, **{c: s.get(c) for c in columns}} for method, s in summaries.items()]


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(rows: Sequence[Row], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV atomically; the header is ``columns`` or the first row's keys.

    Returns:
        The written path.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to write")
    header = list(rows[0].keys()) if columns is None else list(columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return write_text(buf.getvalue(), path)


def write_marked_block(path: str | Path, name: str, block: str, title: str = "") -> Path:
    """Replace the block between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in a
    Markdown file (appending it, or creating the file with ``title``, when absent), atomically.

    The benchmarks keep their tables in BENCHMARKS.md and docs/ this way, leaving the prose
    around them alone.

    Args:
        path: the Markdown file.
        name: the block's marker name, e.g. ``"bench_solver"``.
        block: the new content between the markers.
        title: the first line of a file that does not exist yet.

    Returns:
        The written path.
    """
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else (f"{title}\n\n" if title else "")
    new = f"{begin}\n{block.strip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + new + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(text, path)
