"""PNG figures of registrations: image planes, entropy maps, label contours, Dice box plots.

The registration figure, written by every run, is painted with numpy and Pillow (no matplotlib
import, see :mod:`voxelopt._figure`); the comparison figure uses matplotlib's object API on an
Agg canvas (no pyplot, no global backend change), imported when drawn. Both are written
atomically. Volumes are ``(D, H, W)`` arrays (numpy or torch) in the RAS+ array order of
``voxelopt.io``: axis 0 points to the patient's right, axis 1 anterior, axis 2 superior.
Planes are shown in the radiological convention, each panel lettered at its edges: axial
(``axis=2``) with the patient's right on the image's left and anterior up; coronal
(``axis=1``) right on the left and superior up; sagittal (``axis=0``) anterior on the left and
superior up. Panels keep the voxel spacing's physical proportions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxelopt._label_stats import _plane, mean_dice, most_labels
from voxelopt.ct import BODY_HU
from voxelopt.io import atomic_output

__all__ = [
    "FigurePlane",
    "choose_slices",
    "save_comparison_figure",
    "save_registration_figure",
    "save_registration_planes",
]

_PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
#: (left, right, bottom, top) letters of a displayed plane, by slicing axis.
_LETTERS = {0: ("A", "P", "I", "S"), 1: ("R", "L", "I", "S"), 2: ("R", "L", "P", "A")}
#: Smallest and largest side of an image panel, pixels at ``dpi=100``.
PANEL_MIN_PX, PANEL_MAX_PX = 300, 900


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:  # allow (1, 1, D, H, W)
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (D, H, W) volume, got shape {x.shape}")
    return x


def _display(plane: np.ndarray) -> np.ndarray:
    """A plane ``np.take(volume, i, axis)`` as shown: rows upwards, columns left to right.

    The second remaining axis (anterior or superior) becomes the rows (drawn with
    ``origin="lower"``, so it increases upwards); the first remaining axis (right or anterior)
    becomes the columns, reversed, so that the patient's right (sagittal: anterior) is on the
    image's left.
    """
    return np.ascontiguousarray(plane.T[:, ::-1])


def _check_shapes(volumes: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    ref_name, ref = next(iter(volumes.items()))
    for name, v in volumes.items():
        if v.shape != ref.shape:
            raise ValueError(f"{name} has shape {v.shape}, {ref_name} has {ref.shape}")
    return ref.shape


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    return int(axis)


def _check_index(index: int, n: int, axis: int) -> int:
    if not 0 <= int(index) < n:
        raise ValueError(f"index {index} is outside 0..{n - 1} along axis {axis}")
    return int(index)


def choose_slices(
    shape: Sequence[int], fixed_labels=None, fixed=None, axes: Sequence[int] = (2, 1)
) -> dict[int, int]:
    """The slice index along each axis that a registration figure shows.

    With labels: the slice crossing the most distinct labels, and of those the one with the
    largest labelled area (the organs, not their edges). Without labels: through the centroid
    of the body (``fixed > BODY_HU``), else the middle.

    Args:
        shape: ``(D, H, W)`` of the volumes.
        fixed_labels: optional ``(D, H, W)`` integer labels of the fixed image.
        fixed: optional ``(D, H, W)`` fixed image in HU (used without labels).
        axes: the slicing axes (default axial then coronal).

    Returns:
        ``{axis: index}`` in the order of ``axes``.
    """
    mask = None
    if fixed_labels is not None:
        labels = _to_numpy(fixed_labels, "fixed_labels")
        if labels.any():
            return most_labels(labels, [_check_axis(a) for a in axes])
    if fixed is not None:
        mask = _to_numpy(fixed, "fixed") > BODY_HU
    out = {}
    for a in axes:
        n = shape[_check_axis(a)]
        if mask is None or not mask.any():
            out[a] = n // 2
            continue
        counts = mask.sum(axis=tuple(i for i in range(3) if i != a))
        out[a] = int(round(float(np.dot(counts, np.arange(n)) / counts.sum())))
    return out


@dataclass(frozen=True)
class FigurePlane:
    """The 2-D planes of one row of a registration figure.

    Every array is ``np.take(volume, index, axis)`` of a ``(D, H, W)`` volume on the fixed
    grid (array order, not yet flipped for display).

    Attributes:
        axis: slicing axis: 2 axial, 1 coronal, 0 sagittal.
        index: the slice index (shown in the row label).
        fixed: fixed image plane (HU).
        moving: moving image plane (HU), resampled onto the fixed grid.
        moved: moved image plane (HU).
        entropy: optional displacement entropy plane (nats).
        fixed_labels: optional fixed labels, outlined on the fixed and moved panels.
        moving_labels: optional moving labels, outlined on the moving panel.
    """

    axis: int
    index: int
    fixed: np.ndarray
    moving: np.ndarray
    moved: np.ndarray
    entropy: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None

    @classmethod
    def cut(cls, axis: int, index: int, **volumes) -> FigurePlane:
        """The plane ``index`` along ``axis`` of ``(D, H, W)`` volumes (``None`` allowed)."""
        planes = {k: None if v is None else _plane(v, axis, index) for k, v in volumes.items()}
        return cls(axis, index, **planes)


def _rows(shape, axis, index, fixed_labels, fixed) -> dict[int, int]:
    """``{axis: index}`` of the figure's rows from ``save_registration_figure``'s arguments."""
    if axis is None:  # a one-voxel slab shows its own plane only
        axes = next(((a,) for a in range(3) if shape[a] == 1), (2, 1))
    else:
        axes = (axis,) if np.ndim(axis) == 0 else tuple(axis)
    axes = tuple(_check_axis(a) for a in axes)
    if index is None or isinstance(index, Mapping):
        chosen = choose_slices(shape, fixed_labels, fixed, axes)
        chosen.update(dict(index or {}))
    elif len(axes) == 1:
        chosen = {axes[0]: index}
    else:
        raise ValueError(f"index must be a {{axis: index}} mapping for several axes {axes}")
    return {a: _check_index(i, shape[a], a) for a, i in chosen.items()}


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f} %"


def save_registration_figure(
    path: str | Path,
    fixed,
    moving,
    moved,
    entropy=None,
    fixed_labels=None,
    moving_labels=None,
    moved_labels=None,
    axis: int | Sequence[int] | None = None,
    index: int | Mapping[int, int] | None = None,
    window: tuple[float, float] = (-160.0, 240.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    dpi: int = 100,
    dice_before: float | None = None,
    dice_after: float | None = None,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Fixed, moving, moved (and entropy) in an axial and a coronal plane, written as PNG.

    One row per plane (default: axial, then coronal, each through the labelled organs, see
    :func:`choose_slices`); fixed-label contours on the fixed and moved panels, moving-label
    contours on the moving panel; the mean Dice before (moving vs fixed labels) and after
    (moved vs fixed labels) in the title. See :func:`save_registration_planes` for the look.

    Args:
        path: output ``.png`` (written atomically; the folder must exist).
        fixed: ``(D, H, W)`` fixed image (HU); ``(1, 1, D, H, W)`` tensors are accepted too.
        moving: ``(D, H, W)`` moving image on the fixed grid (HU).
        moved: ``(D, H, W)`` moving image warped onto the fixed grid (HU).
        entropy: optional ``(D, H, W)`` displacement entropy (nats), shown with a colour bar.
        fixed_labels: optional ``(D, H, W)`` fixed labels (contours; slice choice; Dice).
        moving_labels: optional moving labels on the fixed grid (contours; Dice before).
        moved_labels: optional warped moving labels (Dice after).
        axis: slicing axis or axes, one row each: 2 axial, 1 coronal, 0 sagittal
            (default ``(2, 1)``; for one-voxel slabs, e.g. ``(D, 1, W)``, the slab's plane).
        index: slice index (one axis) or ``{axis: index}``; default :func:`choose_slices`.
        window: grey-value window in HU (default: abdomen window, level 40, width 400).
        spacing: voxel size in mm ``(sx, sy, sz)``, for the panels' proportions.
        title: optional title, before the Dice values.
        dpi: resolution (100: the smaller side of each image panel is about 300 pixels).
        dice_before: mean Dice before registration; default computed from the labels (not
            for a one-voxel slab, where it would be the slab's Dice).
        dice_after: mean Dice after registration; default computed from the labels (idem).
        label_names: optional ``{label: name}`` for the legend of contour colours.

    Returns:
        The written path.
    """
    vols = {"fixed": _to_numpy(fixed, "fixed"), "moving": _to_numpy(moving, "moving")}
    vols["moved"] = _to_numpy(moved, "moved")
    given = {
        "entropy": entropy,
        "fixed_labels": fixed_labels,
        "moving_labels": moving_labels,
        "moved_labels": moved_labels,
    }
    vols.update({k: _to_numpy(v, k) for k, v in given.items() if v is not None})
    shape = _check_shapes(vols)
    chosen = _rows(shape, axis, index, vols.get("fixed_labels"), vols["fixed"])
    labels = vols.get("fixed_labels") if min(shape) > 1 else None  # no Dice of a slab
    if dice_before is None and labels is not None and "moving_labels" in vols:
        dice_before = mean_dice(vols["moving_labels"], labels)
    if dice_after is None and labels is not None and "moved_labels" in vols:
        dice_after = mean_dice(vols["moved_labels"], labels)
    shown = {k: v for k, v in vols.items() if k != "moved_labels"}
    planes = [FigurePlane.cut(a, i, **shown) for a, i in chosen.items()]
    return save_registration_planes(
        path, planes, spacing, window, title, dpi, dice_before, dice_after, label_names
    )


def save_registration_planes(
    path: str | Path,
    planes: Sequence[FigurePlane],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window: tuple[float, float] = (-160.0, 240.0),
    title: str | None = None,
    dpi: int = 100,
    dice_before: float | None = None,
    dice_after: float | None = None,
    label_names: Mapping[int, str] | None = None,
    moving_heading: str = "moving",
) -> Path:
    """The registration figure from planes already cut (e.g. resampled slab by slab).

    One row per plane, columns fixed, moving, moved (and entropy, with a colour bar in nats
    shared by the rows). Panels keep the physical proportions of ``spacing``; at ``dpi=100``
    the smaller side of each is :data:`PANEL_MIN_PX` pixels (the larger at most
    :data:`PANEL_MAX_PX`). Orientation letters mark each panel's edges; label contours are
    drawn along voxel edges, one saturated colour per label, with a legend below.

    Args:
        path: output ``.png`` (written atomically; the folder must exist).
        planes: the rows (:class:`FigurePlane`), all with or all without entropy.
        spacing: voxel size in mm ``(sx, sy, sz)`` of the fixed grid.
        window: grey-value window in HU.
        title: optional title, before the Dice values.
        dpi: resolution.
        dice_before: mean Dice before registration, or ``None``.
        dice_after: mean Dice after registration, or ``None``.
        label_names: optional ``{label: name}`` for the legend.
        moving_heading: the moving column's heading (e.g. ``"moving (affine)"`` when the
            planes show it after a pre-alignment).

    Returns:
        The written path.
    """
    from voxelopt._figure import draw_registration

    if not planes:
        raise ValueError("planes is empty: nothing to draw")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {tuple(spacing)}")
    if len({p.entropy is None for p in planes}) > 1:
        raise ValueError("planes: give entropy for every plane or for none")
    for p in planes:
        _check_axis(p.axis)
        shapes = {k: getattr(p, k) for k in ("fixed", "moving", "moved", "entropy")}
        shapes.update({k: getattr(p, k) for k in ("fixed_labels", "moving_labels")})
        _check_shapes({k: np.asarray(v) for k, v in shapes.items() if v is not None})
    text = [title] if title else []
    if dice_before is not None or dice_after is not None:
        text.append(f"mean Dice {_percent(dice_before)} before, {_percent(dice_after)} after")
    spacing = [float(s) for s in spacing]
    image = draw_registration(
        planes, spacing, window, ": ".join(text), label_names, dpi, moving_heading
    )
    return _save_rgb(image, path, dpi)


def _save(fig, path: str | Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _save_rgb(image: np.ndarray, path: str | Path, dpi: int) -> Path:
    """Write an ``(H, W, 3)`` uint8 image as PNG, atomically."""
    from voxelopt._figure import png_bytes

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(png_bytes(np.ascontiguousarray(image, dtype=np.uint8), dpi))
    return path


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
        axis: slicing axis (default 1, coronal), shown in the radiological convention.
        index: slice index (default: the middle).
        window: grey-value window in HU (default: abdomen window, level 40, width 400).
        spacing: voxel size in mm, for the aspect ratio.
        dpi: resolution.

    Returns:
        The written path.
    """
    from voxelopt._figure import draw_comparison

    if not moved_by_method:
        raise ValueError("moved_by_method is empty: nothing to compare")
    if not dice_per_organ:
        raise ValueError("dice_per_organ is empty: nothing to plot")
    vols = {"fixed": _to_numpy(fixed, "fixed")}
    for name, vol in moved_by_method.items():
        vols[name] = _to_numpy(vol, f"moved_by_method[{name!r}]")
    shape = _check_shapes(vols)
    axis = _check_axis(axis)
    index = _check_index(shape[axis] // 2 if index is None else index, shape[axis], axis)
    rest = [float(spacing[i]) for i in range(3) if i != axis]
    images = {k: _display(_plane(v, axis, index)) for k, v in vols.items()}
    fig = draw_comparison(images, axis, rest[1] / rest[0], dice_per_organ, label_names, window)
    return _save(fig, path, dpi)
