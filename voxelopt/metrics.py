"""Registration metrics: label overlap, surface distance, Jacobian statistics, endpoint error.

The functional core works on one pair (label maps ``(D, H, W)``) or on a batch of fields
(displacements ``(B, 3, D, H, W)`` in voxels). :class:`RegistrationMetrics` wraps them in a
torchmetrics ``Metric`` whose state is keyed by pair id, so that pairs repeated across DDP ranks
(a ``DistributedSampler`` pads uneven datasets by repeating samples) are counted once.

Conventions:

* A label absent from **both** images is left out of Dice and HD95 (not counted as 1 or 0).
* HD95 of a label present in only one image is ``nan`` and is excluded from means.
* Means over labels or pairs ignore ``nan``; the mean of nothing is ``nan``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

from voxelopt.io import atomic_output
from voxelopt.transform import check_displacement

__all__ = [
    "BTCV13_LABELS",
    "RegistrationMetrics",
    "SUMMARY_COLUMNS",
    "dice",
    "dice_per_label",
    "endpoint_error",
    "hd95",
    "jacobian_determinant",
    "mean_over_labels",
    "nonpositive_jacobian_fraction",
    "sdlogj",
    "write_pair_csv",
    "write_summary_markdown",
]

#: The 13 organs of the paper's dataset, in label order (``docs/method.md``).
BTCV13_LABELS: dict[int, str] = {
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_splenic_vein",
    11: "pancreas",
    12: "left_adrenal",
    13: "right_adrenal",
}

ArrayLike = Tensor | np.ndarray


def _as_label_array(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
            raise ValueError(f"{name} must hold integer labels, got non-integer values")
        x = x.astype(np.int64)
    elif x.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    return x


def _label_pair(
    pred: ArrayLike, target: ArrayLike, labels: Iterable[int] | None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    p = _as_label_array(pred, "pred_labels")
    t = _as_label_array(target, "target_labels")
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: pred {p.shape}, target {t.shape}")
    if labels is None:
        found = np.union1d(np.unique(p), np.unique(t))
        labels = [int(v) for v in found if v != 0]
    else:
        labels = [int(v) for v in labels]
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
    p, t, labels = _label_pair(pred_labels, target_labels, labels)
    out: dict[int, float] = {}
    for lab in labels:
        pm, tm = p == lab, t == lab
        total = int(pm.sum()) + int(tm.sum())
        if total == 0:
            continue
        out[lab] = 2.0 * float(np.logical_and(pm, tm).sum()) / total
    return out


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
    out = torch.empty(p.shape[0], len(labels), dtype=torch.float64, device=p.device)
    for j, lab in enumerate(labels):
        pm, tm = p == lab, t == lab
        total = (pm.sum(1) + tm.sum(1)).double()
        inter = (pm & tm).sum(1).double()
        out[:, j] = torch.where(total > 0, 2.0 * inter / total.clamp_min(1), float("nan"))
    return out


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


def _spacing3(spacing: float | Sequence[float], name: str = "spacing") -> tuple[float, ...]:
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"{name} must be a positive number or 3 positive numbers, got {spacing}")
    return spacing


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (the image border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, grown by ``margin`` inside the grid."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        box.append(slice(max(int(idx[0]) - margin, 0), int(idx[-1]) + margin + 1))
    return tuple(box)


def hd95(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: float | Sequence[float],
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """95th-percentile Hausdorff distance per label, in mm.

    Surfaces are the mask voxels with a face neighbour outside the mask. For each surface voxel
    of one map, the distance to the nearest surface voxel of the other (Euclidean, in mm via
    ``spacing``) is measured with a distance transform; the result is the larger of the two
    directed 95th percentiles (the MONAI / Learn2Reg ``surface-distance`` convention).

    Args:
        pred: integer label map ``(D, H, W)``.
        target: integer label map ``(D, H, W)``.
        spacing: voxel size in mm, one number or one per axis.
        labels: labels to score; default every non-zero label found in either map.

    Returns:
        ``{label: hd95_mm}``; labels absent from both maps are left out, a label present in
        only one map gives ``nan`` (excluded by :func:`mean_over_labels`).
    """
    p, t, labels = _label_pair(pred, target, labels)
    if p.ndim != 3:
        raise ValueError(f"hd95 expects (D, H, W) label maps, got shape {p.shape}")
    spacing = _spacing3(spacing)
    out: dict[int, float] = {}
    for lab in labels:
        pm, tm = p == lab, t == lab
        has_p, has_t = bool(pm.any()), bool(tm.any())
        if not has_p and not has_t:
            continue
        if not (has_p and has_t):
            out[lab] = float("nan")
            continue
        # Crop to the union's bounding box plus one voxel: distances to the (all enclosed)
        # surface voxels and the erosion are unchanged, the transforms get much smaller.
        box = _bounding_box(pm | tm)
        pm, tm = pm[box], tm[box]
        sp, st = _surface(pm), _surface(tm)
        dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
        dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
        out[lab] = float(max(np.percentile(dist_to_t[sp], 95), np.percentile(dist_to_p[st], 95)))
    return out


def jacobian_determinant(disp: Tensor) -> Tensor:
    """Jacobian determinant of the map ``x -> x + u(x)``.

    Derivatives are central differences in the interior and one-sided first-order differences
    on the outermost voxels (``torch.gradient``, ``edge_order=1``). With ``u`` in voxels the
    determinant is the physical one for any (anisotropic) spacing.

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in voxels (each spatial size >= 2).

    Returns:
        ``(B, D, H, W)`` determinant (dimensionless; 1 = volume preserved, <= 0 = folding).
    """
    check_displacement(disp)
    if min(disp.shape[2:]) < 2:
        raise ValueError(f"displacement needs >= 2 voxels per axis, got {tuple(disp.shape)}")
    # grads[j][:, i] = d u_i / d x_j
    grads = torch.gradient(disp, dim=(2, 3, 4))
    jac = torch.stack(grads, dim=2)  # (B, 3 (i), 3 (j), D, H, W)
    eye = torch.eye(3, dtype=disp.dtype, device=disp.device).view(1, 3, 3, 1, 1, 1)
    jac = (jac + eye).permute(0, 3, 4, 5, 1, 2)
    return torch.linalg.det(jac)


def _interior(x: Tensor, margin: int) -> Tensor:
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if margin == 0:
        return x
    if min(x.shape[-3:]) <= 2 * margin:
        raise ValueError(f"margin {margin} leaves no interior in a grid of {tuple(x.shape[-3:])}")
    return x[..., margin:-margin, margin:-margin, margin:-margin]


def sdlogj(disp: Tensor, variant: str = "l2r", margin: int = 2) -> Tensor:
    """Standard deviation of the log Jacobian determinant (smoothness of a field).

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in voxels.
        variant: ``"l2r"`` (Learn2Reg evaluation: ``log(clip(J + 3, 1e-9, 1e9))``) or
            ``"plain"`` (``log(clip(J, 1e-9, 1e9))``).
        margin: voxels dropped at each face before the statistic (Learn2Reg drops 2).

    Returns:
        ``(B,)`` population standard deviation over the interior.
    """
    if variant not in ("l2r", "plain"):
        raise ValueError(f"variant must be 'l2r' or 'plain', got {variant!r}")
    jac = _interior(jacobian_determinant(disp), margin)
    if variant == "l2r":
        jac = jac + 3.0
    logj = jac.clamp(1e-9, 1e9).log().flatten(1)
    return logj.std(dim=1, unbiased=False)


def nonpositive_jacobian_fraction(disp: Tensor, margin: int = 2) -> Tensor:
    """Fraction of voxels whose Jacobian determinant is ``<= 0`` (folding).

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in voxels.
        margin: voxels dropped at each face (as in :func:`sdlogj`).

    Returns:
        ``(B,)`` fraction in ``[0, 1]``.
    """
    jac = _interior(jacobian_determinant(disp), margin)
    return (jac <= 0).flatten(1).to(disp.dtype).mean(dim=1)


def endpoint_error(
    disp: Tensor,
    true_disp: Tensor,
    spacing: float | Sequence[float] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean Euclidean distance between two displacement fields.

    Args:
        disp: ``(B, 3, D, H, W)`` estimated displacement in voxels.
        true_disp: ``(B, 3, D, H, W)`` ground-truth displacement in voxels.
        spacing: voxel size in mm (one number or one per axis); ``None`` gives voxels.
        mask: optional ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` boolean region to average over.

    Returns:
        ``(B,)`` mean endpoint error, in mm if ``spacing`` is given, else in voxels.
    """
    check_displacement(disp)
    check_displacement(true_disp, "true_disp")
    if disp.shape != true_disp.shape:
        raise ValueError(
            f"displacements differ in shape: {tuple(disp.shape)} vs {tuple(true_disp.shape)}"
        )
    diff = disp - true_disp.to(disp.dtype)
    if spacing is not None:
        s = torch.tensor(_spacing3(spacing), dtype=disp.dtype, device=disp.device)
        diff = diff * s.view(1, 3, 1, 1, 1)
    err = diff.norm(dim=1)  # (B, D, H, W)
    if mask is None:
        return err.flatten(1).mean(dim=1)
    mask = mask.reshape(err.shape) if mask.dim() == 5 else mask
    if mask.shape != err.shape:
        raise ValueError(f"mask must be (B, 1, D, H, W) like disp, got {tuple(mask.shape)}")
    m = mask.to(err.dtype).flatten(1)
    return (err.flatten(1) * m).sum(1) / m.sum(1)


# --------------------------------------------------------------------------------------------
# torchmetrics wrapper
# --------------------------------------------------------------------------------------------

_ID_BYTES = 128


def _encode_id(pair_id: str | int) -> Tensor:
    raw = str(pair_id).encode("utf-8")
    if len(raw) > _ID_BYTES:
        raise ValueError(f"pair id {pair_id!r} is longer than {_ID_BYTES} bytes")
    buf = torch.zeros(_ID_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return buf


def _decode_id(buf: Tensor) -> str:
    raw = bytes(buf.cpu().tolist())
    return raw.rstrip(b"\x00").decode("utf-8")


class RegistrationMetrics(Metric):
    """Per-pair registration scores, safe under DDP with uneven or repeated pairs.

    Each ``update`` stores one row per pair: its id (as fixed-length bytes, so it can be
    gathered across ranks) and a float64 vector of scores, all in one flat float64 state
    reduced with ``"cat"`` (a rank that saw no pair contributes an empty tensor).
    :meth:`compute` keeps the first row of every pair id, so a pair scored on two ranks (or
    twice on one, e.g. a ``DistributedSampler`` padding an uneven split) counts once.

    Columns of a row: ``dice_<label>`` and ``hd95_<label>`` per label, ``dice`` and ``hd95``
    (means over the pair's labels), ``sdlogj_l2r``, ``sdlogj``, ``nonpositive_jacobian``,
    ``epe_mm`` (nan without a true field) and ``runtime_s`` (nan when not given).

    Args:
        labels: labels to score (default the 13 organs of ``BTCV13_LABELS``).
        spacing: voxel size in mm of the grid the labels and fields live on (HD95, EPE).
        jacobian_margin: voxels dropped at each face for the Jacobian statistics.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(
        self,
        labels: Sequence[int] = tuple(BTCV13_LABELS),
        spacing: float | Sequence[float] = 1.0,
        jacobian_margin: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.labels = [int(v) for v in labels]
        if not self.labels:
            raise ValueError("labels must not be empty")
        self.spacing = _spacing3(spacing)
        self.jacobian_margin = int(jacobian_margin)
        self.columns = (
            [f"dice_{lab}" for lab in self.labels]
            + [f"hd95_{lab}" for lab in self.labels]
            + ["dice", "hd95", "sdlogj_l2r", "sdlogj", "nonpositive_jacobian", "epe_mm"]
            + ["runtime_s"]
        )
        # One flat float64 state (id bytes then scores, row after row): a single 1-D tensor
        # per update gathers across ranks with uneven or empty lengths.
        self.add_state("rows_flat", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    @property
    def _row_width(self) -> int:
        return _ID_BYTES + len(self.columns)

    def update(
        self,
        pair_ids: Sequence[str | int],
        moved_labels: Tensor,
        fixed_labels: Tensor,
        disp: Tensor,
        true_disp: Tensor | None = None,
        runtime_s: float | Sequence[float] | Tensor | None = None,
        spacing: float | Sequence[float] | None = None,
        epe_mask: Tensor | None = None,
    ) -> None:
        """Score a batch of registered pairs.

        Args:
            pair_ids: ``B`` unique names of the pairs (str or int, <= 128 bytes).
            moved_labels: ``(B, 1, D, H, W)`` or ``(B, D, H, W)`` warped moving labels.
            fixed_labels: same shape, fixed labels.
            disp: ``(B, 3, D, H, W)`` estimated displacement in voxels.
            true_disp: optional ``(B, 3, D, H, W)`` ground truth in voxels.
            runtime_s: optional seconds per pair (one number for all or ``B`` numbers).
            spacing: voxel size in mm of this batch's grid (default: the constructor's).
            epe_mask: optional ``(B, 1, D, H, W)`` boolean region where the endpoint error is
                averaged (e.g. the body: outside it a synthetic field is not identifiable).
        """
        spacing = self.spacing if spacing is None else _spacing3(spacing)
        if isinstance(pair_ids, (str, int)):
            raise TypeError("pair_ids must be a sequence of ids, one per pair")
        check_displacement(disp)
        b = disp.shape[0]
        if len(pair_ids) != b:
            raise ValueError(f"got {len(pair_ids)} pair ids for a batch of {b}")
        dsc = dice_per_label(moved_labels, fixed_labels, self.labels).cpu()
        j_l2r = sdlogj(disp.detach(), "l2r", self.jacobian_margin).double().cpu()
        j_plain = sdlogj(disp.detach(), "plain", self.jacobian_margin).double().cpu()
        neg = nonpositive_jacobian_fraction(disp.detach(), self.jacobian_margin).double().cpu()
        if true_disp is None:
            epe = torch.full((b,), float("nan"), dtype=torch.float64)
        else:
            epe = endpoint_error(disp.detach(), true_disp.detach(), spacing, epe_mask)
            epe = epe.double().cpu()
        if runtime_s is None:
            rt = torch.full((b,), float("nan"), dtype=torch.float64)
        else:
            rt = torch.as_tensor(runtime_s, dtype=torch.float64).flatten().cpu()
            rt = rt.expand(b) if rt.numel() == 1 else rt
            if rt.numel() != b:
                raise ValueError(f"runtime_s must hold 1 or {b} values, got {rt.numel()}")
        moved = moved_labels.reshape(b, *moved_labels.shape[-3:]).cpu()
        fixed = fixed_labels.reshape(b, *fixed_labels.shape[-3:]).cpu()
        for k, pid in enumerate(pair_ids):
            hd = hd95(moved[k], fixed[k], spacing, self.labels)
            hd_row = torch.tensor([hd.get(lab, float("nan")) for lab in self.labels])
            row = torch.cat(
                [
                    dsc[k],
                    hd_row.double(),
                    torch.stack(
                        [
                            dsc[k].nanmean(),
                            hd_row.double().nanmean(),
                            j_l2r[k],
                            j_plain[k],
                            neg[k],
                            epe[k],
                            rt[k],
                        ]
                    ),
                ]
            )
            flat = torch.cat([_encode_id(pid).double(), row])
            self.rows_flat.append(flat.to(self.device))

    def _unique_rows(self) -> tuple[list[str], Tensor]:
        flat = self.rows_flat
        if isinstance(flat, list):
            flat = torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)
        table = flat.detach().cpu().double().reshape(-1, self._row_width)
        first: dict[str, int] = {}
        for k in range(table.shape[0]):
            first.setdefault(_decode_id(table[k, :_ID_BYTES].to(torch.uint8)), k)
        return list(first), table[list(first.values()), _ID_BYTES:]

    def rows(self) -> list[dict[str, float | str]]:
        """One dict per unique pair (first occurrence kept): ``{"pair": id, column: value}``."""
        names, vals = self._unique_rows()
        return [
            {
                "pair": n,
                **{c: float(v) for c, v in zip(self.columns, vals[k].tolist(), strict=True)},
            }
            for k, n in enumerate(names)
        ]

    def compute(self) -> dict[str, float]:
        """Means over unique pairs (``nan``-aware) of every column, plus ``num_pairs``."""
        names, vals = self._unique_rows()
        out = {c: float(vals[:, j].nanmean()) for j, c in enumerate(self.columns)}
        out["num_pairs"] = float(len(names))
        return out


def write_pair_csv(rows: Sequence[Mapping[str, float | str]], path: str | Path) -> Path:
    """Write per-pair rows (e.g. :meth:`RegistrationMetrics.rows`) as CSV, atomically.

    Args:
        rows: dicts with the same keys; the first row's keys give the header.
        path: output ``.csv`` path.

    Returns:
        The written path.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to write")
    path = Path(path)
    header = list(rows[0].keys())
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


#: the summary numbers of :class:`RegistrationMetrics`, in table order
SUMMARY_COLUMNS = (
    "dice",
    "hd95",
    "sdlogj_l2r",
    "sdlogj",
    "nonpositive_jacobian",
    "epe_mm",
    "runtime_s",
)


def write_summary_markdown(
    summaries: Mapping[str, Mapping[str, float]],
    path: str | Path,
    columns: Sequence[str] = SUMMARY_COLUMNS,
    digits: int = 4,
) -> Path:
    """Write a Markdown table, one row per method, of summary numbers, atomically.

    Args:
        summaries: ``{method: RegistrationMetrics.compute() output}``.
        path: output ``.md`` path.
        columns: which summary keys to show (missing ones print as ``-``).
        digits: significant digits.

    Returns:
        The written path.
    """
    if not summaries:
        raise ValueError("summaries is empty: nothing to write")
    path = Path(path)
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for method, summary in summaries.items():
        cells = []
        for c in columns:
            v = summary.get(c)
            cells.append("-" if v is None or math.isnan(v) else f"{v:.{digits}g}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
