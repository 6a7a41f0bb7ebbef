"""Scoring one registered pair: the one implementation every caller uses.

:func:`score_registration` takes the displacement of a registration and whatever is known
about the pair (label maps, a true field, a runtime) and returns :class:`PairScores`: Dice and
HD95 per label and their means, SDlogJ in both variants, the fraction of folding voxels, the
endpoint error inside a mask and the runtime. The command line, :func:`voxelopt.register`, the
Lightning module, the comparison runner and the benchmarks all score through it, and
:class:`voxelopt.metrics.aggregate.RegistrationMetrics` aggregates its rows over pairs and ranks.
:func:`timed` measures a runtime with device synchronisation.

Score names (the columns of every table): ``dice_<label>``, ``hd95_<label>`` (mm), ``dice`` and
``hd95`` (means over the pair's labels), ``sdlogj_l2r`` (Learn2Reg: ``log(clip(J + 3))``),
``sdlogj`` (plain ``log(clip(J))``), ``nonpositive_jacobian`` (fraction), ``epe_mm``,
``runtime_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from voxelopt.checks import check_displacement, check_spacing
from voxelopt.metrics.endpoint import endpoint_error
from voxelopt.metrics.jacobian import jacobian_determinant, nonpositive_jacobian_fraction, sdlogj
from voxelopt.metrics.overlap import dice_per_label
from voxelopt.metrics.surface import hd95
from voxelopt.transform import warp

__all__ = [
    "SUMMARY_COLUMNS",
    "Evaluation",
    "PairScores",
    "register_and_score",
    "score_columns",
    "score_registration",
    "timed",
]

#: the per-pair summary scores, in table order
SUMMARY_COLUMNS: tuple[str, ...] = (
    "dice",
    "hd95",
    "sdlogj_l2r",
    "sdlogj",
    "nonpositive_jacobian",
    "epe_mm",
    "runtime_s",
)

_NAN = float("nan")


def score_columns(labels: Sequence[int]) -> list[str]:
    """Column names of :meth:`PairScores.row` for these labels, in table order."""
    return (
        [f"dice_{lab}" for lab in labels]
        + [f"hd95_{lab}" for lab in labels]
        + list(SUMMARY_COLUMNS)
    )


@dataclass
class PairScores:
    """The scores of one registered pair (``nan`` where a score is undefined).

    Attributes:
        labels: the labels scored.
        dice: ``{label: Dice}`` (``nan`` for a label absent from both maps).
        hd95: ``{label: HD95 in mm}`` (``nan`` for a label missing from either map).
        sdlogj_l2r: standard deviation of ``log(J + 3)`` (Learn2Reg).
        sdlogj: standard deviation of ``log(J)``.
        nonpositive_jacobian: fraction of voxels with ``J <= 0``.
        epe_mm: mean endpoint error in mm inside the mask (``nan`` without a true field).
        runtime_s: seconds of the registration (``nan`` when not given).
        undefined: ``{score: reason}`` for every score that is ``nan`` and why.
    """

    labels: tuple[int, ...] = ()
    dice: dict[int, float] = field(default_factory=dict)
    hd95: dict[int, float] = field(default_factory=dict)
    sdlogj_l2r: float = _NAN
    sdlogj: float = _NAN
    nonpositive_jacobian: float = _NAN
    epe_mm: float = _NAN
    runtime_s: float = _NAN
    undefined: dict[str, str] = field(default_factory=dict)

    @property
    def dice_mean(self) -> float:
        """Mean Dice over the labels with a value (``nan`` if none)."""
        return _nanmean(self.dice.values())

    @property
    def hd95_mean(self) -> float:
        """Mean HD95 in mm over the labels with a value (``nan`` if none)."""
        return _nanmean(self.hd95.values())

    def summary(self) -> dict[str, float]:
        """``{name: value}`` for :data:`SUMMARY_COLUMNS`."""
        means = {"dice": self.dice_mean, "hd95": self.hd95_mean}
        return {c: means[c] if c in means else float(getattr(self, c)) for c in SUMMARY_COLUMNS}

    def row(self, labels: Sequence[int] | None = None) -> dict[str, float]:
        """Flat ``{column: value}`` (see :func:`score_columns`), per label for ``labels``."""
        labels = self.labels if labels is None else tuple(labels)
        out = {f"dice_{lab}": self.dice.get(lab, _NAN) for lab in labels}
        out |= {f"hd95_{lab}": self.hd95.get(lab, _NAN) for lab in labels}
        return out | self.summary()

    def to_json(self) -> dict:
        """JSON-safe scores: ``None`` for every undefined number, reasons under ``undefined``."""
        return {
            **{k: _json_number(v) for k, v in self.summary().items()},
            "dice_per_label": {str(k): _json_number(v) for k, v in self.dice.items()},
            "hd95_per_label_mm": {str(k): _json_number(v) for k, v in self.hd95.items()},
            "undefined": dict(self.undefined),
        }


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else _NAN


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _labels_of(fixed: Tensor, moved: Tensor) -> tuple[int, ...]:
    f, m = (x.detach().cpu().numpy().ravel() for x in (fixed, moved))
    if f.size and m.size and min(f.min(), m.min()) >= 0 and max(f.max(), m.max()) < 1 << 16:
        n = int(max(f.max(), m.max())) + 1  # bincount: one pass; unique sorts
        found = np.flatnonzero(np.bincount(f, minlength=n) + np.bincount(m, minlength=n))
    else:
        found = np.union1d(np.unique(f), np.unique(m))
    return tuple(int(v) for v in found.tolist() if v != 0)


def _label_scores(
    scores: PairScores, moved: Tensor, fixed: Tensor, spacing, labels: Sequence[int] | None
) -> None:
    if moved.shape != fixed.shape:
        raise ValueError(
            f"moved labels {tuple(moved.shape)} and fixed labels {tuple(fixed.shape)} differ"
        )
    scores.labels = _labels_of(fixed, moved) if labels is None else tuple(int(v) for v in labels)
    if not scores.labels:
        scores.undefined["dice"] = scores.undefined["hd95"] = "no label in either map"
        return
    d = dice_per_label(moved[None], fixed[None], scores.labels)[0].tolist()
    scores.dice = dict(zip(scores.labels, d, strict=True))
    h = hd95(moved.cpu(), fixed.cpu(), spacing, scores.labels)
    scores.hd95 = {lab: h.get(lab, _NAN) for lab in scores.labels}
    absent = [lab for lab, v in scores.dice.items() if math.isnan(v)]
    one_sided = [lab for lab, v in scores.hd95.items() if math.isnan(v) and lab not in absent]
    if absent:
        scores.undefined["dice_per_label"] = f"labels {absent} are in neither map"
    if one_sided:
        scores.undefined["hd95_per_label_mm"] = f"labels {one_sided} are in only one map"


def _jacobian_scores(scores: PairScores, disp: Tensor, margin: int) -> None:
    if min(disp.shape[2:]) <= max(2 * margin, 1):
        reason = f"grid {tuple(disp.shape[2:])} has no interior inside a {margin}-voxel margin"
        for key in ("sdlogj_l2r", "sdlogj", "nonpositive_jacobian"):
            scores.undefined[key] = reason
        return
    jac_disp = disp.double() if disp.device.type == "cpu" else disp.float()
    det = jacobian_determinant(jac_disp)  # once for the three statistics
    scores.sdlogj_l2r = float(sdlogj(jac_disp, "l2r", margin, det=det)[0])
    scores.sdlogj = float(sdlogj(jac_disp, "plain", margin, det=det)[0])
    scores.nonpositive_jacobian = float(nonpositive_jacobian_fraction(jac_disp, margin, det)[0])


def score_registration(
    displacement: Tensor,
    *,
    spacing: float | Sequence[float] = 1.0,
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    moved_labels: Tensor | None = None,
    labels: Sequence[int] | None = None,
    true_displacement: Tensor | None = None,
    mask: Tensor | None = None,
    runtime_s: float | None = None,
    jacobian_margin: int = 2,
) -> PairScores:
    """Score one registered pair.

    Args:
        displacement: ``(1, 3, D, H, W)`` in voxels of the grid everything here lives on.
        spacing: voxel size of that grid in mm (HD95, endpoint error).
        fixed_labels: ``(D, H, W)`` integer labels of the fixed image.
        moving_labels: ``(D, H, W)`` moving labels on the same grid; warped here by nearest
            neighbour (``moved(x) = moving(x + u(x))``).
        moved_labels: already warped moving labels instead of ``moving_labels``.
        labels: labels to score (default: every non-zero label of either map).
        true_displacement: ``(1, 3, D, H, W)`` known field in voxels (synthetic pairs).
        mask: ``(D, H, W)`` or ``(1, 1, D, H, W)`` boolean region of the endpoint error
            (e.g. the body, :func:`voxelopt.ct.body_mask`); default everywhere.
        runtime_s: seconds the registration took (see :func:`timed`).
        jacobian_margin: voxels dropped at each face for the Jacobian statistics.

    Returns:
        :class:`PairScores`; label scores only when fixed labels and moving (or moved) labels
        are given.
    """
    check_displacement(displacement)
    if displacement.shape[0] != 1:
        raise ValueError(
            f"displacement must hold one pair (1, 3, D, H, W), got {displacement.shape}"
        )
    if moving_labels is not None and moved_labels is not None:
        raise ValueError("give moving_labels or moved_labels, not both")
    spacing = check_spacing(spacing)
    disp = displacement.detach()
    scores = PairScores(runtime_s=_NAN if runtime_s is None else float(runtime_s))
    if runtime_s is None:
        scores.undefined["runtime_s"] = "not measured"
    _jacobian_scores(scores, disp, jacobian_margin)
    if moving_labels is not None:
        moving = moving_labels.reshape(1, 1, *moving_labels.shape[-3:])
        moved_labels = warp(moving.to(disp.device), disp, mode="nearest")[0, 0]
    if fixed_labels is not None and moved_labels is not None:
        fixed = fixed_labels.reshape(fixed_labels.shape[-3:]).to(moved_labels.device)
        moved = moved_labels.reshape(moved_labels.shape[-3:])
        _label_scores(scores, moved, fixed, spacing, labels)
    else:
        scores.undefined["dice"] = scores.undefined["hd95"] = "no label maps of both images"
    if true_displacement is not None:
        m = None if mask is None else mask.reshape(1, *disp.shape[2:]).to(disp.device)
        epe = endpoint_error(disp, true_displacement.to(disp.device), spacing, m)
        scores.epe_mm = float(epe[0])
    else:
        scores.undefined["epe_mm"] = "no true displacement"
    return scores


def timed(fn: Callable[[], object], device: torch.device | str | None = None):
    """Run ``fn()`` and measure its wall time, synchronising a CUDA device before and after.

    Args:
        fn: the work, without arguments (e.g. ``lambda: model(fixed, moving)``).
        device: the device the work runs on (``None`` or CPU: no synchronisation).

    Returns:
        ``(result, seconds)``.
    """
    device = None if device is None else torch.device(device)
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


@dataclass
class Evaluation:
    """What :func:`register_and_score` returns for a batch of pairs.

    Attributes:
        displacement: ``(B, 3, D, H, W)`` in voxels.
        scores: one :class:`PairScores` per pair.
        entropy: ``(B, 1, D, H, W)`` finest-level entropy on the image grid, when asked for
            and the model has a ``solve`` method; else ``None``.
    """

    displacement: Tensor
    scores: list[PairScores]
    entropy: Tensor | None = None


def _run_model(model, fixed_hu: Tensor, moving_hu: Tensor, with_entropy: bool):
    from voxelopt.transform import resize_volume

    if with_entropy and hasattr(model, "solve"):
        result = model.solve(fixed_hu, moving_hu)
        return result.displacement, resize_volume(result.entropy.float(), fixed_hu.shape[2:])
    return model(fixed_hu, moving_hu), None


def register_and_score(
    model,
    fixed_hu: Tensor,
    moving_hu: Tensor,
    *,
    spacing: float | Sequence[float] | Tensor,
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    true_displacement: Tensor | None = None,
    labels: Sequence[int] | None = None,
    argmin: str | None = None,
    with_entropy: bool = False,
) -> Evaluation:
    """Register a batch with any registration model, time it, and score every pair.

    The one sequence "time -> warp labels (nearest) -> score" of the Lightning module, the
    comparison runner and the benchmarks. The endpoint error is averaged inside the body of the
    fixed image (:func:`voxelopt.ct.body_mask`): in the air around it a synthetic field moves
    nothing visible and no method can recover it.

    Args:
        model: a :class:`voxelopt.registration.RegistrationModel`.
        fixed_hu: ``(B, 1, D, H, W)`` fixed CT in HU.
        moving_hu: ``(B, 1, D, H, W)`` moving CT in HU on the same grid.
        spacing: voxel size in mm, one for all pairs or ``(B, 3)``.
        fixed_labels: ``(B, 1, D, H, W)`` integer labels, optional.
        moving_labels: ``(B, 1, D, H, W)`` integer labels, optional.
        true_displacement: ``(B, 3, D, H, W)`` known fields in voxels, optional.
        labels: labels to score (default: those found in each pair).
        argmin: ``"hard"``/``"soft"`` for the duration (see
            :func:`voxelopt.registration.argmin_mode`); ``None`` keeps the model's.
        with_entropy: also return the finest entropy map (models with ``solve``).

    Returns:
        :class:`Evaluation`; each pair's runtime is the batch's wall time divided by ``B``.
    """
    from voxelopt.ct import body_mask
    from voxelopt.registration import argmin_mode

    b = fixed_hu.shape[0]
    spacings = torch.as_tensor(spacing, dtype=torch.float64).cpu()
    spacings = (spacings.expand(3) if spacings.numel() == 1 else spacings).reshape(-1, 3)
    with argmin_mode(model, argmin):
        (disp, entropy), seconds = timed(
            lambda: _run_model(model, fixed_hu, moving_hu, with_entropy), fixed_hu.device
        )
    disp = disp.detach()
    scores = []
    for k in range(b):
        sp = spacings[k if spacings.shape[0] == b else 0].tolist()
        scores.append(
            score_registration(
                disp[k : k + 1],
                spacing=sp,
                fixed_labels=None if fixed_labels is None else fixed_labels[k],
                moving_labels=None if moving_labels is None else moving_labels[k],
                labels=labels,
                true_displacement=None
                if true_displacement is None
                else true_displacement[k : k + 1],
                mask=body_mask(fixed_hu[k]),
                runtime_s=seconds / b,
            )
        )
    return Evaluation(disp, scores, entropy)
