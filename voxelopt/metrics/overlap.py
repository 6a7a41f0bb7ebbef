"""Label overlap: Dice per label (one pair or a batch) and nan-aware means over labels.

A label absent from **both** maps is left out (not counted as 1 or 0); means ignore ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from voxelopt.checks import check_label_array

__all__ = ["dice", "dice_per_label", "label_pair", "mean_over_labels"]

ArrayLike = Tensor | np.ndarray


def _checked_pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = check_label_array(pred, "pred_labels")
    t = check_label_array(target, "target_labels")
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: pred {p.shape}, target {t.shape}")
    return p, t


def _flat_tensor(x: np.ndarray) -> Tensor:
    """A label map as a flat tensor (unsigned types torch cannot reduce become int64)."""
    if x.dtype in (np.uint16, np.uint32, np.uint64):
        if x.size and int(x.max()) >= 2**63:
            raise ValueError(f"label values must be below 2^63, got {int(x.max())}")
        x = x.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(-1)


def _labels_in(p: np.ndarray, t: np.ndarray) -> list[int]:
    """Every non-zero label of either map."""
    return [int(v) for v in np.union1d(np.unique(p), np.unique(t)) if v != 0]


def label_pair(
    pred: ArrayLike, target: ArrayLike, labels: Iterable[int] | None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    p, t = _checked_pair(pred, target)
    labels = _labels_in(p, t) if labels is None else [int(v) for v in labels]
    return p, t, labels


def dice(
    pred_labels: ArrayLike, target_labels: ArrayLike, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice overlap per label.

    Args:
        pred_labels: integer label map of any shape, e.g. ``(D, H, W)`` (warped moving labels).
        target_labels: integer label map of the same shape (fixed labels).
        labels: labels to score; default every non-zero label found in either map.

    Returns:
        ``{label: dice}`` in ``[0, 1]``; labels absent from both maps are left out.
    """
    p_np, t_np = _checked_pair(pred_labels, target_labels)
    p, t = _flat_tensor(p_np), _flat_tensor(t_np)
    labels = None if labels is None else [int(v) for v in labels]
    joint = _joint_histogram(p, t, labels or ())
    if labels is None and joint is not None:  # every label present, from the one histogram
        labels = [lab for lab in (joint.sum(0) + joint.sum(1)).nonzero().flatten().tolist() if lab]
    elif labels is None:
        labels = _labels_in(p_np, t_np)
    if not labels:
        return {}
    if joint is not None:
        scores = _dice_from_joint(joint, labels).tolist()
    else:
        scores = _dice_flat(p[None], t[None], labels)[0].tolist()
    return {lab: v for lab, v in zip(labels, scores, strict=True) if not math.isnan(v)}


def dice_per_label(pred_labels: Tensor, target_labels: Tensor, labels: Sequence[int]) -> Tensor:
    """Batched Dice per label as a tensor.

    Args:
        pred_labels: ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` integer labels.
        target_labels: same shape as ``pred_labels``.
        labels: the ``L`` labels to score.

    Returns:
        ``(B, L)`` float64 Dice; ``nan`` where a label is absent from both maps of a pair.
    """
    if not isinstance(pred_labels, Tensor) or not isinstance(target_labels, Tensor):
        raise TypeError("pred_labels and target_labels must be torch.Tensors")
    if pred_labels.shape != target_labels.shape:
        raise ValueError(
            f"label maps differ in shape: pred {tuple(pred_labels.shape)}, "
            f"target {tuple(target_labels.shape)}"
        )
    if pred_labels.dim() not in (4, 5):
        raise ValueError(
            f"labels must be (B, 1, D, H, W) or (B, D, H, W), got {tuple(pred_labels.shape)}"
        )
    p = pred_labels.reshape(pred_labels.shape[0], -1)
    t = target_labels.reshape(target_labels.shape[0], -1)
    return _dice_flat(p, t, labels)


def _dice_flat(p: Tensor, t: Tensor, labels: Sequence[int]) -> Tensor:
    """``(B, L)`` float64 Dice of ``(B, N)`` label maps (``nan``: label in neither map)."""
    dense = _dice_from_counts(p, t, labels)
    if dense is not None:
        return dense
    out = torch.empty(p.shape[0], len(labels), dtype=torch.float64, device=p.device)
    for j, lab in enumerate(labels):
        pm, tm = p == lab, t == lab
        total = (pm.sum(1) + tm.sum(1)).double()
        inter = (pm & tm).sum(1).double()
        out[:, j] = torch.where(total > 0, 2.0 * inter / total.clamp_min(1), float("nan"))
    return out


def _joint_histogram(p: Tensor, t: Tensor, labels: Sequence[int] = ()) -> Tensor | None:
    """``(n, n)`` counts of (pred, target) label pairs of two flat integer maps whose labels
    (and ``labels``) lie in ``[0, 256)``; ``None`` otherwise."""
    if p.is_floating_point() or p.numel() == 0:
        return None
    n = max(int(max(p.max(), t.max())), max(labels, default=0)) + 1
    if min(int(min(p.min(), t.min())), min(labels, default=0)) < 0 or n > 256:
        return None
    return torch.bincount(p.long() * n + t.long(), minlength=n * n).view(n, n)


def _dice_from_counts(p: Tensor, t: Tensor, labels: Sequence[int]) -> Tensor | None:
    """Dice of ``(B, N)`` maps from one joint histogram per pair (labels in ``[0, 256)``;
    ``None`` otherwise): one pass instead of three per label."""
    if not labels:
        return None
    lab = torch.as_tensor(list(labels), device=p.device)
    out = torch.empty(p.shape[0], len(labels), dtype=torch.float64, device=p.device)
    for b in range(p.shape[0]):
        joint = _joint_histogram(p[b], t[b], labels)
        if joint is None:
            return None
        out[b] = _dice_from_joint(joint, lab)
    return out


def _dice_from_joint(joint: Tensor, labels: Sequence[int] | Tensor) -> Tensor:
    """``(L,)`` float64 Dice of ``labels`` from a joint histogram (``nan``: in neither map)."""
    lab = torch.as_tensor(labels, device=joint.device)
    inter = joint.diagonal()[lab].double()
    total = (joint.sum(1)[lab] + joint.sum(0)[lab]).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1), float("nan"))


def mean_over_labels(values: Mapping[int, float] | Tensor) -> float | Tensor:
    """Mean of per-label values ignoring ``nan`` (e.g. of :func:`dice` or :func:`hd95`).

    Args:
        values: ``{label: value}`` or a ``(B, L)`` tensor.

    Returns:
        A float (``nan`` if no finite value) or a ``(B,)`` tensor.
    """
    if isinstance(values, Tensor):
        return values.nanmean(dim=-1)
    finite = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")
