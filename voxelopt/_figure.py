"""Drawing of :mod:`voxelopt.visualize`'s figures.

The registration figure, written by every run, is painted without matplotlib (whose import
alone costs several times the rest of the figure in a process that has not loaded it): the
layout is computed in pixels (at 100 dpi; ``dpi`` scales it), so the PNG's size is known in
advance; images, label outlines (along voxel edges, just inside each region), the colour bar and
the legend's swatches are painted into an RGB raster with numpy; text is drawn by Pillow (a
dependency of matplotlib) in DejaVu Sans, the font matplotlib ships; the PNG is written by
:func:`png_bytes`. The comparison figure (box plots) uses matplotlib, imported when drawn.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence

import numpy as np

from voxelopt.visualize import (
    _LETTERS,
    _PLANE_NAMES,
    PANEL_MAX_PX,
    PANEL_MIN_PX,
    FigurePlane,
    _display,
)

_GAP, _LEFT, _ROW_TITLE = 10, 34, 22
#: Outline colours of labels 1, 2, ... (cycled), saturated enough to read on grey CT; chosen so
#: that neighbouring organs of BTCV (spleen, kidneys, ..., liver, stomach, ...) differ.
_LABEL_COLOURS = (
    "3d8bff ffd000 ff8c1a 2ee62e 00e5e5 ff3030 ff40ff a366ff 00bfa0 c8ff3c ff8fb0 7fb2ff e0a060"
)
#: matplotlib's "magma" at 17 evenly spaced points (linear between them: within 2.3 / 255).
_MAGMA = "000004 0a0822 1d1147 36106b 51127c 6a1c81 832681 9c2e7f b73779 cf4070 e55064 f4695c \
fb8761 fea571 fec287 fde0a1 fcfdbf"


def _rgb(hexes: str) -> np.ndarray:
    """``(n, 3)`` uint8 colours of space-separated ``rrggbb`` strings."""
    return np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in hexes.split()], np.uint8)


@functools.lru_cache(maxsize=2)
def _lut(name: str) -> np.ndarray:
    """``(256, 3)`` uint8 lookup table: ``"gray"`` or ``"magma"``."""
    if name == "gray":
        return np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    anchors = _rgb(_MAGMA).astype(np.float64)
    x, xp = np.linspace(0.0, 1.0, 256), np.linspace(0.0, 1.0, len(anchors))
    return np.stack([np.interp(x, xp, anchors[:, c]) for c in range(3)], 1).round().astype(np.uint8)


def _colour(image: np.ndarray, lut: str, vmin: float, vmax: float) -> np.ndarray:
    """``(rows, cols, 3)`` uint8: ``image`` clipped to ``[vmin, vmax]`` through a lookup table."""
    scaled = (np.asarray(image, dtype=np.float32) - vmin) * (255.0 / max(vmax - vmin, 1e-12))
    return _lut(lut)[np.clip(scaled, 0.0, 255.0).astype(np.uint8)]


@functools.lru_cache(maxsize=16)
def _font(size_pt: float, dpi: int, bold: bool = False):
    """DejaVu Sans from matplotlib's data folder (not importing matplotlib) at ``size_pt``."""
    from PIL import ImageFont

    size = max(1, round(size_pt * dpi / 72.0))
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        path = os.path.join(spec.submodule_search_locations[0], "mpl-data", "fonts", "ttf", name)
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def _upsample(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D (or RGB) image to ``rows x cols`` pixels."""
    r = np.bincount(((np.arange(rows) + 0.5) * image.shape[0] / rows).astype(np.intp))
    c = np.bincount(((np.arange(cols) + 0.5) * image.shape[1] / cols).astype(np.intp))
    return np.repeat(np.repeat(image, r, axis=0), c, axis=1)


class _Canvas:
    """An RGB figure laid out in units of 1/100 inch from its top-left corner.

    Images, outlines and rules are painted at once; text is queued and drawn last, by Pillow.
    """

    def __init__(self, width: float, height: float, dpi: int):
        self.dpi, self.f = dpi, dpi / 100.0
        self.w, self.h = round(width * self.f), round(height * self.f)
        self.raster = np.full((self.h, self.w, 3), 255, dtype=np.uint8)
        self.texts: list[tuple] = []

    def _box(self, box) -> tuple[int, int, int, int]:
        """Raster ``(row0, row1, col0, col1)`` of a layout box ``(x, y_top, w, h)``."""
        x, y, w, h = (v * self.f for v in box)
        return round(y), round(y + h), round(x), round(x + w)

    def fill(self, box, rgb) -> None:
        """Paint a layout box in one colour (at least one pixel each way)."""
        r0, r1, c0, c1 = self._box(box)
        self.raster[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = rgb

    def image(self, rgb: np.ndarray, box) -> None:
        """Paint ``rgb`` (first row at the bottom) over ``box``, nearest-neighbour."""
        r0, r1, c0, c1 = self._box(box)
        self.raster[r0:r1, c0:c1] = _upsample(rgb[::-1], r1 - r0, c1 - c0)

    def outline(self, labels: np.ndarray, box, palette: np.ndarray, width: int) -> None:
        """Outline each region of a displayed 2-D label image shown in ``box``.

        Every pixel of a non-zero label within ``width`` pixels of a different label (along a
        row or column) takes the label's colour ``palette[(label - 1) % len(palette)]``.
        """
        r0, r1, c0, c1 = self._box(box)
        up = _upsample(np.asarray(labels)[::-1], r1 - r0, c1 - c0)
        edge = np.zeros(up.shape, dtype=bool)
        for s in range(1, width + 1):
            rows, cols = up[s:] != up[:-s], up[:, s:] != up[:, :-s]
            edge[s:] |= rows
            edge[:-s] |= rows
            edge[:, s:] |= cols
            edge[:, :-s] |= cols
        edge &= up != 0
        values = up[edge].astype(np.int64)
        self.raster[r0:r1, c0:c1][edge] = palette[(values - 1) % len(palette)]

    def text(self, x, y_top, s, size=10.0, anchor="mm", bold=False, vertical=False, **kw):
        """Queue text at a layout point; ``anchor`` as Pillow's (e.g. ``"mm"``, ``"lt"``).

        ``vertical`` text reads upwards, centred on the point (``anchor`` ``"r"``: its right
        edge there).
        """
        self.texts.append((x * self.f, y_top * self.f, s, size, anchor, bold, vertical, kw))

    def render(self) -> np.ndarray:
        """``(H, W, 3)`` uint8: the raster with the queued text drawn over it."""
        from PIL import Image, ImageDraw

        img = Image.fromarray(self.raster)
        draw = ImageDraw.Draw(img)
        for x, y, s, size, anchor, bold, vertical, kw in self.texts:
            font = _font(size, self.dpi, bold)
            if not vertical:
                draw.text((x, y), s, font=font, anchor=anchor, fill=kw.pop("fill", 0), **kw)
                continue
            left, top, right, bottom = font.getbbox(s)
            mask = Image.new("L", (right - left, bottom - top), 0)
            ImageDraw.Draw(mask).text((-left, -top), s, font=font, fill=255)
            mask = mask.rotate(90, expand=True)
            x0 = x - mask.width if anchor == "r" else x - mask.width / 2
            img.paste((0, 0, 0), (round(x0), round(y - mask.height / 2)), mask)
        return np.asarray(img)


def _letters(canvas: _Canvas, box, axis: int) -> None:
    """The orientation letters inside the four edges of a panel: white, outlined in black."""
    left, right, bottom, top = _LETTERS[axis]
    x, y, w, h = box
    style = {"size": 11, "bold": True, "fill": (255, 255, 255), "stroke_fill": (0, 0, 0)}
    style["stroke_width"] = max(1, round(canvas.f))
    canvas.text(x + 4, y + h / 2, left, anchor="lm", **style)
    canvas.text(x + w - 4, y + h / 2, right, anchor="rm", **style)
    canvas.text(x + w / 2, y + h - 4, bottom, anchor="md", **style)
    canvas.text(x + w / 2, y + 4, top, anchor="mt", **style)


def _ticks(lo: float, hi: float) -> list[float]:
    """At most six round tick values in ``[lo, hi]``."""
    span = hi - lo
    for step in (10.0 ** np.floor(np.log10(span / 5)) * m for m in (1, 2, 2.5, 5, 10)):
        if span / step <= 5.0001:
            ks = range(int(np.ceil(lo / step - 1e-9)), int(np.floor(hi / step + 1e-9)) + 1)
            return [round(k * step, 12) + 0.0 for k in ks]
    return [lo, hi]


def _entropy_range(planes: Sequence[FigurePlane]) -> tuple[float, float]:
    """Colour range of the entropy panels: the 1st percentile of the shown planes to their
    maximum (entropy is often high nearly everywhere; what matters is where it is low)."""
    values = np.concatenate([np.asarray(p.entropy, dtype=np.float32).ravel() for p in planes])
    lo, hi = float(np.percentile(values, 1.0)), float(values.max())
    return (lo, hi) if hi > lo else (hi - 1.0, hi)


def _colourbar(canvas: _Canvas, box, lo: float, hi: float) -> None:
    x, y, w, h = box
    canvas.fill((x - 1, y - 1, w + 2, h + 2), 0)  # a one-pixel black frame
    canvas.image(_lut("magma")[:, None, :], box)
    for t in _ticks(lo, hi):
        yt = y + h * (hi - t) / (hi - lo)
        canvas.fill((x + w, yt, 4, 0), 0)
        canvas.text(x + w + 6, yt, f"{t:g}", size=8, anchor="lm")
    canvas.text(x + w + 40, y + h / 2, "displacement entropy (nats)", size=10, vertical=True)


def _legend_rows(names: Sequence[str], width: float) -> list[list[tuple[int, float]]]:
    """``names`` split into rows of ``(position, width)`` that fit in ``width`` (layout units)."""
    font = _font(8, 100)
    rows: list[list[tuple[int, float]]] = [[]]
    for i, name in enumerate(names):
        w = 34 + font.getlength(name)
        if rows[-1] and sum(v for _, v in rows[-1]) + w > width:
            rows.append([])
        rows[-1].append((i, w))
    return rows


def _legend(canvas: _Canvas, x, y, width, found, names, palette) -> None:
    """Colour key of the outlined labels: centred rows from ``(x, y)`` (top) over ``width``."""
    for k, row in enumerate(_legend_rows(names, width)):
        xi = x + (width - sum(w for _, w in row)) / 2
        yi = y + 9 + 18 * k
        for i, w in row:
            canvas.fill((xi, yi - 1.5, 18, 3), palette[(found[i] - 1) % len(palette)])
            canvas.text(xi + 22, yi, names[i], size=8, anchor="lm")
            xi += w


def _found_labels(planes: Sequence[FigurePlane]) -> list[int]:
    found: set[int] = set()
    for p in planes:
        for lab in (p.fixed_labels, p.moving_labels):
            if lab is not None:
                found |= {int(v) for v in np.unique(lab) if v != 0}
    return sorted(found)


def _plane_mm(plane: FigurePlane, spacing: Sequence[float]) -> tuple[float, float]:
    """(width, height) in mm of the displayed plane."""
    rest = [i for i in range(3) if i != plane.axis]
    n = np.shape(plane.fixed)
    return n[0] * spacing[rest[0]], n[1] * spacing[rest[1]]


def draw_registration(
    planes: Sequence[FigurePlane],
    spacing: Sequence[float],
    window: tuple[float, float],
    title: str,
    label_names: Mapping[int, str] | None,
    dpi: int = 100,
    moving_heading: str = "moving",
) -> np.ndarray:
    """The registration figure as ``(H, W, 3)`` uint8 (see ``save_registration_planes``)."""
    extents = [_plane_mm(p, spacing) for p in planes]
    sides = [v for e in extents for v in e]
    scale = min(PANEL_MIN_PX / min(sides), PANEL_MAX_PX / max(sides))  # layout units per mm
    cell_w = round(max(w for w, _ in extents) * scale)
    heights = [round(h * scale) for _, h in extents]
    has_entropy = planes[0].entropy is not None
    cols = ["fixed", "moving", "moved"] + (["entropy"] * has_entropy)
    top = (40 if title else 8) + _ROW_TITLE
    body_w = len(cols) * cell_w + (len(cols) - 1) * _GAP
    found = _found_labels(planes)
    names = [f"{v} {label_names.get(v, '')}".strip() if label_names else str(v) for v in found]
    legend_h = 18 * len(_legend_rows(names, body_w)) + 8 if found else 8
    canvas = _Canvas(
        _LEFT + body_w + (96 if has_entropy else 10),
        top + sum(heights) + _GAP * (len(planes) - 1) + legend_h,
        dpi,
    )
    palette = _rgb(_LABEL_COLOURS)
    lo, hi = _entropy_range(planes) if has_entropy else (0.0, 1.0)
    y = top
    for p, (w_mm, _), h in zip(planes, extents, heights, strict=True):
        w = round(w_mm * scale)
        x0 = _LEFT + (cell_w - w) / 2
        for k, name in enumerate(cols):
            box = (x0 + k * (cell_w + _GAP), y, w, h)
            if name == "entropy":
                canvas.image(_colour(_display(p.entropy), "magma", lo, hi), box)
            else:
                canvas.image(_colour(_display(getattr(p, name)), "gray", *window), box)
                labels = p.moving_labels if name == "moving" else p.fixed_labels
                if labels is not None:
                    canvas.outline(_display(labels), box, palette, max(1, round(2 * canvas.f)))
            _letters(canvas, box, p.axis)
            if y == top:
                heading = {"entropy": "entropy (nats)", "moving": moving_heading}.get(name, name)
                canvas.text(box[0] + w / 2, y - 5, heading, size=11, anchor="md")
        label = f"{_PLANE_NAMES[p.axis]} ({'xyz'[p.axis]} = {p.index})"
        canvas.text(_LEFT - 8, y + h / 2, label, size=10, anchor="r", vertical=True)
        y += h + _GAP
    if has_entropy:
        _colourbar(canvas, (_LEFT + body_w + 10, top, 14, y - _GAP - top), lo, hi)
    if title:
        canvas.text(_LEFT + body_w / 2, 10, title, size=13, anchor="mt")
    if found:
        _legend(canvas, _LEFT, y - _GAP + 4, body_w, found, names, palette)
    return canvas.render()


def png_bytes(image: np.ndarray, dpi: int) -> bytes:
    """An ``(H, W, 3)`` uint8 image as PNG bytes (Pillow, zlib level 3: the figure's flat
    areas compress well at a fraction of the default level's time)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        buf, format="PNG", compress_level=3, dpi=(dpi, dpi)
    )
    return buf.getvalue()


_LETTER_STYLE = {"color": "white", "fontsize": 11, "fontweight": "bold"}


def _axes_letters(ax, axis: int) -> None:
    left, right, bottom, top = _LETTERS[axis]
    t = ax.transAxes
    ax.text(0.012, 0.5, left, transform=t, ha="left", va="center", **_LETTER_STYLE)
    ax.text(0.988, 0.5, right, transform=t, ha="right", va="center", **_LETTER_STYLE)
    ax.text(0.5, 0.012, bottom, transform=t, ha="center", va="bottom", **_LETTER_STYLE)
    ax.text(0.5, 0.988, top, transform=t, ha="center", va="top", **_LETTER_STYLE)


def draw_comparison(
    images: Mapping[str, np.ndarray],
    axis: int,
    pixel_aspect: float,
    dice_per_organ: Mapping[str, Mapping[int, Sequence[float]]],
    label_names: Mapping[int, str] | None,
    window: tuple[float, float],
):
    """Slices of each method (displayed arrays) over a box plot of Dice per organ (matplotlib
    ``Figure``)."""
    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(max(2.6 * n, 8.0), 7.0))
    grid = fig.add_gridspec(2, n, height_ratios=(1.2, 1.0))
    for k, (name, image) in enumerate(images.items()):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(
            image, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=pixel_aspect
        )
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        _axes_letters(ax, axis)
    _dice_boxes(fig.add_subplot(grid[1, :]), dice_per_organ, label_names)
    return fig


def _dice_boxes(ax, dice_per_organ, label_names) -> None:
    import matplotlib

    labels = sorted({int(lab) for per in dice_per_organ.values() for lab in per})
    methods = list(dice_per_organ)
    width = 0.8 / len(methods)
    colours = matplotlib.colormaps["tab10"]
    for m, method in enumerate(methods):
        data, positions = [], []
        for j, lab in enumerate(labels):
            values = [v for v in dice_per_organ[method].get(lab, []) if np.isfinite(v)]
            if values:
                data.append(values)
                positions.append(j + (m - (len(methods) - 1) / 2) * width)
        if not data:
            continue
        box = ax.boxplot(
            data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False
        )
        for patch in box["boxes"]:
            patch.set_facecolor(colours(m % 10))
            patch.set_alpha(0.7)
        box["boxes"][0].set_label(method)
    names = [label_names.get(lab, str(lab)) if label_names else str(lab) for lab in labels]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Dice")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
