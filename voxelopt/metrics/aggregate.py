"""``RegistrationMetrics``: per-pair scores aggregated over pairs and DDP ranks (torchmetrics).

Rows come from :func:`voxelopt.evaluation.score_registration`, the one scoring function; this
module only stores and gathers them. It imports torchmetrics, so ``import voxelopt`` does not
load it (``voxelopt.metrics.RegistrationMetrics`` resolves lazily).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from voxelopt.checks import check_displacement, check_spacing
from voxelopt.ct import BTCV13_LABELS
from voxelopt.evaluation import PairScores, score_columns, score_registration

__all__ = ["RegistrationMetrics"]

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
        self.spacing = check_spacing(spacing)
        self.jacobian_margin = int(jacobian_margin)
        self.columns = score_columns(self.labels)
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
        spacing = self.spacing if spacing is None else check_spacing(spacing)
        if isinstance(pair_ids, (str, int)):
            raise TypeError("pair_ids must be a sequence of ids, one per pair")
        check_displacement(disp)
        b = disp.shape[0]
        if len(pair_ids) != b:
            raise ValueError(f"got {len(pair_ids)} pair ids for a batch of {b}")
        rt = [None] * b
        if runtime_s is not None:
            t = torch.as_tensor(runtime_s, dtype=torch.float64).flatten().cpu()
            t = t.expand(b) if t.numel() == 1 else t
            if t.numel() != b:
                raise ValueError(f"runtime_s must hold 1 or {b} values, got {t.numel()}")
            rt = t.tolist()
        moved = moved_labels.reshape(b, *moved_labels.shape[-3:])
        fixed = fixed_labels.reshape(b, *fixed_labels.shape[-3:])
        for k, pid in enumerate(pair_ids):
            scores = score_registration(
                disp[k : k + 1],
                spacing=spacing,
                fixed_labels=fixed[k],
                moved_labels=moved[k],
                labels=self.labels,
                true_displacement=None if true_disp is None else true_disp[k : k + 1],
                mask=None if epe_mask is None else epe_mask[k],
                runtime_s=rt[k],
                jacobian_margin=self.jacobian_margin,
            )
            self.add(pid, scores)

    def add(self, pair_id: str | int, scores: PairScores) -> None:
        """Store the scores of one pair (from :func:`voxelopt.evaluation.score_registration`).

        Args:
            pair_id: unique name of the pair (str or int, <= 128 bytes).
            scores: its scores; labels missing from ``scores`` count as ``nan``.
        """
        values = scores.row(self.labels)
        row = torch.tensor([values[c] for c in self.columns], dtype=torch.float64)
        flat = torch.cat([_encode_id(pair_id).double(), row])
        self.rows_flat.append(flat.to(self.device))
        # what torchmetrics' wrapped ``update`` does: count it (else ``compute`` warns that
        # nothing was updated) and drop a cached result
        self._update_count += 1
        self._computed = None

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
