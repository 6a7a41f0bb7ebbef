"""PNG figures of registrations: image slices, entropy maps, label contours, Dice box plots.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
change) and written atomically. Volumes are ``(D, H, W)`` arrays (numpy or torch) in the RAS+
array order of ``voxelopt.io``; a slice is taken across ``axis`` (0 sagittal, 1 coronal,
2 axial) and shown with the last remaining axis vertical, increasing upwards (superior up in
coronal and sagittal views).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from voxelopt.io import atomic_output

__all__ = ["save_comparison_figure", "save_registration_figure"]

_CONTOUR_CMAP = "tab20"


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:  # allow (1, 1, D, H, W)
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (D, H, W) volume, got shape {x.shape}")
    return x


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D slice, transposed so that the last remaining axis is vertical (rows)."""
    return np.take(volume, index, axis=axis).T


def _aspect(spacing: Sequence[float], axis: int) -> float:
    rest = [s for i, s in enumerate(spacing) if i != axis]
    return rest[1] / rest[0]


def _check_common(volumes: Mapping[str, np.ndarray], axis: int, index: int | None) -> int:
    shapes = {name: v.shape for name, v in volumes.items()}
    ref_name, ref_shape = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if shape != ref_shape:
            raise ValueError(f"{name} has shape {shape}, {ref_name} has {ref_shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    n = ref_shape[axis]
    index = n // 2 if index is None else int(index)
    if not 0 <= index < n:
        raise ValueError(f"index {index} is outside 0..{n - 1} along axis {axis}")
    return index


def _contours(ax, labels: np.ndarray) -> None:
    """Outline every non-zero label of a 2-D slice, one colour per label value."""
    cmap = matplotlib.colormaps[_CONTOUR_CMAP]
    for v in np.unique(labels):
        mask = (labels == v).astype(float)
        if v == 0 or mask.min() == 1:
            continue
        ax.contour(mask, levels=[0.5], colors=[cmap(int(v) % 20)], linewidths=0.8)


def _image_panel(ax, image: np.ndarray, window, title: str, aspect: float) -> None:
    ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def save_registration_figure(
    path: str | Path,
    fixed,
    moving,
    moved,
    entropy=None,
    fixed_labels=None,
    moving_labels=None,
    moved_labels=None,
    axis: int = 1,
    index: int | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Fixed, moving, moved (and entropy) slices side by side, written as PNG.

    Args:
        path: output ``.png`` (written atomically; the folder must exist).
        fixed: ``(D, H, W)`` fixed image (HU).
        moving: ``(D, H, W)`` moving image (HU).
        moved: ``(D, H, W)`` moving image warped onto the fixed grid (HU).
        entropy: optional ``(D, H, W)`` displacement entropy (nats), shown with a colour bar.
        fixed_labels: optional ``(D, H, W)`` labels drawn as contours on the fixed panel (and
            on the moved panel, to judge the overlap).
        moving_labels: optional labels drawn on the moving panel.
        moved_labels: optional warped labels drawn on the moved panel.
        axis: slicing axis: 0 sagittal, 1 coronal, 2 axial.
        index: slice index along ``axis`` (default: the middle).
        window: grey-value window in HU (default: abdomen window, level 40, width 400).
        spacing: voxel size in mm, for the aspect ratio.
        title: optional figure title.
        dpi: resolution.

    Returns:
        The written path.
    """
    vols = {"fixed": _to_numpy(fixed, "fixed"), "moving": _to_numpy(moving, "moving")}
    vols["moved"] = _to_numpy(moved, "moved")
    if entropy is not None:
        vols["entropy"] = _to_numpy(entropy, "entropy")
    labels = {}
    for name, lab in (
        ("fixed_labels", fixed_labels),
        ("moving_labels", moving_labels),
        ("moved_labels", moved_labels),
    ):
        if lab is not None:
            labels[name] = _to_numpy(lab, name)
    index = _check_common({**vols, **labels}, axis, index)
    aspect = _aspect(spacing, axis)

    panels = len(vols)
    fig = Figure(figsize=(3.2 * panels, 3.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, name in zip(axes, ("fixed", "moving", "moved"), strict=False):
        _image_panel(ax, _slice(vols[name], axis, index), window, name, aspect)
    sl = {k: _slice(v, axis, index) for k, v in labels.items()}
    if "fixed_labels" in sl:
        _contours(axes[0], sl["fixed_labels"])
    if "moving_labels" in sl:
        _contours(axes[1], sl["moving_labels"])
    if "moved_labels" in sl:
        _contours(axes[2], sl["moved_labels"])
    if "entropy" in vols:
        ax = axes[3]
        im = ax.imshow(
            _slice(vols["entropy"], axis, index), cmap="magma", origin="lower", aspect=aspect
        )
        ax.set_title("entropy", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def save_comparison_figure(
    path: str | Path,
    fixed,
    moved_by_method: Mapping[str, object],
    dice_per_organ: Mapping[str, Mapping[int, Sequence[float]]],
    label_names: Mapping[int, str] | None = None,
    axis: int = 1,
    index: int | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    dpi: int = 100,
) -> Path:
    """One slice per method beside the fixed image, and a box plot of Dice per organ.

    Args:
        path: output ``.png`` (written atomically).
        fixed: ``(D, H, W)`` fixed image (HU).
        moved_by_method: ``{method: (D, H, W) moved image}`` (e.g. ``initial``, ``voxelopt``).
        dice_per_organ: ``{method: {label: [dice of each pair]}}``.
        label_names: optional ``{label: name}`` for the x axis.
        axis: slicing axis (default 1, coronal).
        index: slice index (default: the middle).
        window: grey-value window in HU (default: abdomen window, level 40, width 400).
        spacing: voxel size in mm, for the aspect ratio.
        dpi: resolution.

    Returns:
        The written path.
    """
    if not moved_by_method:
        raise ValueError("moved_by_method is empty: nothing to compare")
    if not dice_per_organ:
        raise ValueError("dice_per_organ is empty: nothing to plot")
    vols = {"fixed": _to_numpy(fixed, "fixed")}
    for name, vol in moved_by_method.items():
        vols[name] = _to_numpy(vol, f"moved_by_method[{name!r}]")
    index = _check_common(vols, axis, index)
    aspect = _aspect(spacing, axis)

    n = len(vols)
    fig = Figure(figsize=(max(2.6 * n, 8.0), 7.0))
    grid = fig.add_gridspec(2, n, height_ratios=(1.2, 1.0))
    for k, (name, vol) in enumerate(vols.items()):
        _image_panel(fig.add_subplot(grid[0, k]), _slice(vol, axis, index), window, name, aspect)

    ax = fig.add_subplot(grid[1, :])
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
    return _save(fig, path, dpi)
