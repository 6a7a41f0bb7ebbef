"""Tables, figure and BENCHMARKS.md block of ``bench_intersubject.py``.

A row (one method, one direction) is the dict the script saves in ``rows_<direction>.json``:
``direction``, ``method`` (a key of ``intersubject_methods.method_keys``), ``start``, ``wall_s``,
``cpu_s``, ``load_before`` (1-min load average), ``covered`` (share of the fixed organ voxels
mapped inside the moving scan) and the score rows ``own`` / ``common``
(:meth:`voxelopt.evaluation.PairScores.row`; ``None`` for ``nan``). :func:`summary_table` has one
line per method (both directions), :func:`organ_table` the Dice per organ of one direction,
:func:`save_figure` one coronal slice per method with the fixed organs' contours, and
:func:`benchmarks_block` what ``--write`` puts between the ``bench_intersubject`` markers of
BENCHMARKS.md.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from intersubject_case import direction_tag

from voxelopt.ct import BTCV13_LABELS
from voxelopt.tables import format_number, markdown_table, write_csv, write_text
from voxelopt.visualize import _display as display_plane  # (x, z) plane as shown: R left, S up

FEATURE_NAMES = {"raw": "raw", "mind": "MIND", "obelisk": "OBELISK", "mind+obelisk": "MIND+OBELISK"}
_NAMES = {
    "initial": "Initial",
    "convex": "ConvexAdam",
    "ants": "ANTs SyN",
    "elastix": "elastix affine + B-spline",
}


def label(key: str) -> str:
    """Display name of a method key (its start is a column of its own)."""
    head = key.split("_")[0]
    if head in _NAMES:
        return _NAMES[head]
    feature, mode = key.split("_")[1:3]
    smoothing = "adaptive" if mode == "adaptive" else "fixed sigma"
    return f"VoxelOpt {FEATURE_NAMES[feature]}, {smoothing}"


def _mean(values) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


def _directions(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["direction"] for r in rows))


def _summary_line(key: str, rs: dict[str, dict], dirs: list[str]) -> list[str]:
    """The cells of one method; ``rs``: its row per direction."""
    own = [rs[d]["own"]["dice"] if d in rs else None for d in dirs]

    def per_dir(field: str) -> str:
        return " / ".join(format_number(rs[d][field] if d in rs else None, 1, "f") for d in dirs)

    def avg(field: str, tag: str = "own") -> float:
        return _mean([r[tag][field] for r in rs.values()])

    return [
        label(key),
        " / ".join(dict.fromkeys(r["start"] for r in rs.values())),
        *[format_number(v, 1, "f", 100) for v in own],
        format_number(_mean(own), 1, "f", 100),
        format_number(avg("dice", "common"), 1, "f", 100),
        format_number(avg("hd95"), 1, "f"),
        format_number(avg("sdlogj_l2r"), 3, "f"),
        format_number(avg("nonpositive_jacobian"), 2, "f", 100),
        per_dir("wall_s"),
        per_dir("cpu_s"),
        format_number(_mean([r["covered"] for r in rs.values()]), 0, "f", 100),
    ]


def summary_table(rows: list[dict]) -> str:
    """One line per method: Dice and runtimes per direction, the other scores averaged over
    the directions (Dice, non-positive J and organ coverage in %)."""
    dirs = _directions(rows)
    head = [
        "method",
        "starts from",
        *[f"Dice {d} (%)" for d in dirs],
        "Dice mean (%)",
        "Dice mean, common FOV (%)",
        "HD95 (mm)",
        "SDlogJ",
        "non-pos. J (%)",
        f"runtime wall (s) {' / '.join(dirs)}",
        f"runtime CPU (s) {' / '.join(dirs)}",
        "organ voxels covered (%)",
    ]
    lines = []
    for key in dict.fromkeys(r["method"] for r in rows):
        rs = {r["direction"]: r for r in rows if r["method"] == key}
        lines.append(dict(zip(head, _summary_line(key, rs, dirs), strict=True)))
    return markdown_table(lines, head)


def organ_table(rows: list[dict], direction: str) -> str:
    """Dice per organ (own field of view, %) of one direction."""
    rs = [r for r in rows if r["direction"] == direction]
    organs = [int(k[5:]) for k in rs[0]["own"] if k.startswith("dice_")]
    head = ["method", "starts from", *[BTCV13_LABELS[k] for k in organs], "mean"]
    lines = [
        [
            label(r["method"]),
            r["start"],
            *[format_number(r["own"][f"dice_{k}"], 1, "f", 100) for k in organs],
            format_number(r["own"]["dice"], 1, "f", 100),
        ]
        for r in rs
    ]
    return markdown_table([dict(zip(head, cells, strict=True)) for cells in lines], head)


def tables_text(rows: list[dict]) -> str:
    """The summary table, then the Dice per organ of each direction."""
    text = summary_table(rows).rstrip() + "\n"
    for d in _directions(rows):
        text += f"\nDice per organ, {d} (own FOV, %):\n\n" + organ_table(rows, d).rstrip() + "\n"
    return text


def write_tables(rows: list[dict], out: Path) -> str:
    """``out/summary.md`` (:func:`tables_text`) and ``out/rows.csv`` (one line per row, the
    scores flattened as ``own_*`` / ``common_*``); returns the Markdown."""
    text = tables_text(rows)
    keep = ("direction", "method", "start", "wall_s", "cpu_s", "load_before", "covered")
    flat = [
        {
            **{k: r[k] for k in keep},
            **{f"own_{k}": v for k, v in r["own"].items()},
            **{f"common_{k}": v for k, v in r["common"].items()},
        }
        for r in rows
    ]
    write_csv(flat, out / "rows.csv")
    write_text(text, out / "summary.md")
    return text


def figure_path(folder: Path, direction: str) -> Path:
    """Where the figure of a direction goes: ``intersubject_abd_from_chest.png`` etc."""
    return Path(folder) / f"intersubject_{direction_tag(direction)}.png"


def benchmarks_block(rows: list[dict], commands: list[str], figures: list[Path], root: Path) -> str:
    """The ``bench_intersubject`` block of BENCHMARKS.md: heading, commands, the tables
    (:func:`tables_text`) and the links to the figures (paths relative to ``root``)."""
    loads = [r["load_before"] for r in rows if r.get("load_before") is not None]
    lines = [
        "## Inter-subject benchmark (issue 11)",
        "",
        "Written by `benchmarks/bench_intersubject.py --write` from the rows of:",
        "",
        "```",
        *commands,
        "```",
        "",
        "abdomen_ct <-> chest_abdomen_ct, full scans, both ways, on the fixed scan's working grid."
        " Dice on the organs both scans contain, on the fixed voxels the method maps inside the"
        " moving scan (common FOV: those our affine maps inside it); HD95, SDlogJ, non-positive"
        " J averaged over the directions. Runtime: the registration with its affine stage, wall"
        " and process-CPU s, 2 threads unless the command says `--threads`; 1-min load average"
        f" before each row {min(loads, default=0):.1f}-{max(loads, default=0):.1f}.",
        "",
        tables_text(rows).rstrip(),
        "",
    ]
    for path in figures:
        rel = os.path.relpath(path, root)
        lines.append(f"![{path.stem}]({rel})")
    return "\n".join(lines)


def _panel(ax, case, image, inside, index: int, title: str) -> None:
    """One panel: the coronal plane ``index`` of ``image``, red where ``inside`` is False, the
    fixed organs' contours."""
    from matplotlib import colormaps

    sx, _, sz = case.grid.spacing
    plane = display_plane(image[:, index])
    ax.imshow(plane, cmap="gray", vmin=-160, vmax=240, origin="lower", aspect=sz / sx)
    if inside is not None:
        outside = ~display_plane(inside[:, index])
        tint = np.zeros((*outside.shape, 4))
        tint[outside] = (1.0, 0.0, 0.0, 0.25)
        ax.imshow(tint, origin="lower", aspect=sz / sx)
    lab = display_plane(case.fixed_labels_w[:, index])
    colours = colormaps["tab20"]
    for j, organ in enumerate(case.organs):
        if (lab == organ).any():
            mask = (lab == organ).astype(float)
            ax.contour(mask, levels=[0.5], colors=[colours(j)], linewidths=0.8, origin="lower")
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def save_figure(path: Path, case, shown: dict, rows: list[dict]) -> Path:
    """Coronal slice through the fixed liver's centroid: the fixed image, then one panel per
    row (``shown[method] = (moved image, own field-of-view mask)`` on the grid) with the fixed
    organs' contours; red tint: fixed voxels outside the moving field of view under that
    method. Written as a 256-colour PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    liver = np.argwhere(case.fixed_labels_w == 6)
    index = int(round(liver[:, 1].mean())) if len(liver) else case.grid.shape[1] // 2
    panels = [(case.fixed_w, None, "fixed " + case.name.split("<-")[0])]
    for r in rows:
        d = r["own"]["dice"]
        dice = "-" if d is None else f"{100 * d:.1f} %"
        title = f"{label(r['method'])}\n[{r['start']}] Dice {dice}"
        panels.append((*shown[r["method"]], title))
    cols = 5
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.6 * nrows))
    FigureCanvasAgg(fig)
    for k, (image, inside, title) in enumerate(panels):
        _panel(fig.add_subplot(nrows, cols, k + 1), case, image, inside, index, title)
    fig.suptitle(
        f"{case.name}: coronal slice y = {index} through the fixed liver, fixed-label "
        "contours; red: outside the moving field of view",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    image = Image.open(buffer).convert("RGB")  # 256-colour palette: a quarter of the bytes
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path
