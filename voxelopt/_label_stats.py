"""Label statistics of the registration figure: slice choice and mean Dice, slab by slab.

Label maps of a full-resolution CT hold tens of millions of voxels; these helpers count them
with ``bincount`` over slabs (no sort, no volume-sized temporary).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``np.take(volume, index, axis)`` as a view (``np.take`` first copies a non-contiguous
    volume whole)."""
    return volume[(slice(None),) * axis + (index,)]


def _slabs(*arrays: np.ndarray, voxels: int = 1 << 20):
    """Matching flat chunks of same-shape arrays: slabs along the first one's outermost axis in
    memory (views there), about ``voxels`` each, so no temporary is volume-sized."""
    first = arrays[0]
    axis = int(np.argmax([abs(s) for s in first.strides]))
    order = "F" if first.flags.f_contiguous and not first.flags.c_contiguous else "C"
    n = first.shape[axis]
    step = max(1, voxels * n // max(first.size, 1))
    for i in range(0, n, step):
        cut = (slice(None),) * axis + (slice(i, i + step),)
        yield [a[cut].ravel(order) for a in arrays]


def _int_range(*arrays: np.ndarray) -> tuple[int, int] | None:
    """``(min, max)`` over integer arrays; ``None`` if any is empty or not of integers."""
    if not all(a.dtype.kind in "iu" and a.size for a in arrays):
        return None
    return min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays)


def _label_coder(*arrays: np.ndarray):
    """The sorted label values found in ``arrays`` and a map of a flat chunk to their indices.

    Non-negative integer labels are counted with ``bincount`` and coded through a lookup table;
    others (e.g. float label maps) go through ``np.unique`` and ``searchsorted``.
    """
    span = _int_range(*arrays)
    if span is not None:
        lo, hi = span
        if 0 <= lo and hi < 1 << 20:
            counts = np.zeros(hi + 1, dtype=np.int64)
            for a in arrays:
                for (chunk,) in _slabs(a):
                    counts += np.bincount(chunk.astype(np.intp, copy=False), minlength=hi + 1)
            values = np.flatnonzero(counts)
            lut = np.zeros(hi + 1, dtype=np.int64)
            lut[values] = np.arange(len(values))
            return values, lambda chunk: lut[chunk]
    values = np.unique(np.concatenate([np.unique(a) for a in arrays]))
    return values, lambda chunk: np.searchsorted(values, chunk)


def most_labels(labels: np.ndarray, axes: Sequence[int]) -> dict[int, int]:
    """Index along each axis whose slice holds the most distinct labels, then the most area."""
    span = _int_range(labels)
    if span is not None and span[0] >= 0 and span[1] < 1 << 16:  # the labels are their codes
        k, code = span[1] + 1, lambda chunk: chunk.astype(np.intp, copy=False)
        nonzero = np.arange(k) != 0
    else:
        values, code = _label_coder(labels)
        k, nonzero = len(values), values != 0
    out = {}
    for axis in axes:
        counts = [
            np.bincount(code(_plane(labels, axis, i).ravel("K")), minlength=k)[nonzero]
            for i in range(labels.shape[axis])
        ]
        counts = np.stack(counts)
        score = (counts > 0).sum(1) * (labels.size + 1) + counts.sum(1)
        out[axis] = int(np.argmax(score))
    return out


def mean_dice(pred_labels: np.ndarray, target_labels: np.ndarray) -> float:
    """Mean Dice over the non-zero labels found in either map (``nan`` if none).

    Same value as ``mean_over_labels(dice(pred, target))`` of :mod:`voxelopt.metrics`, in one
    pass over slabs (``bincount`` of the joint label codes).
    """
    p, t = np.asarray(pred_labels), np.asarray(target_labels)
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: pred {p.shape}, target {t.shape}")
    span = _int_range(p, t)
    if span is not None and span[0] >= 0 and span[1] < 1024:  # the labels are their codes
        k = span[1] + 1
        values, code = np.arange(k), lambda chunk: chunk.astype(np.intp, copy=False)
    else:
        values, code = _label_coder(p, t)
        k = len(values)
    if k > 4096:  # the joint histogram would be too large
        from voxelopt.metrics import dice, mean_over_labels

        return float(mean_over_labels(dice(p, t)))
    joint = np.zeros(k * k, dtype=np.int64)
    for cp, ct in _slabs(p, t):
        joint += np.bincount(code(cp) * k + code(ct), minlength=k * k)
    joint = joint.reshape(k, k)
    total = joint.sum(1) + joint.sum(0)
    keep = (values != 0) & (total > 0)
    dice = 2.0 * np.diag(joint)[keep] / total[keep]
    return float(dice.mean()) if dice.size else float("nan")
