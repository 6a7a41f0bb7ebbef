"""Running every method on the same pairs and scoring them with the one scoring function."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from voxelopt.comparison.methods import METHODS, BuildContext
from voxelopt.ct import BTCV13_LABELS
from voxelopt.data.pair import Pair
from voxelopt.evaluation import register_and_score
from voxelopt.metrics.aggregate import RegistrationMetrics
from voxelopt.transform import warp

__all__ = ["ComparisonResult", "MethodResult", "check_methods", "run_comparison"]


@dataclass
class MethodResult:
    """Scores of one method (or why it was skipped)."""

    key: str
    label: str
    kind: str
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    first_moved: Tensor | None = None  # (D, H, W) moved image of the first pair
    device: str = "cpu"

    @property
    def runtime_median(self) -> float:
        times = [r["runtime_s"] for r in self.rows if not math.isnan(r["runtime_s"])]
        return statistics.median(times) if times else float("nan")


@dataclass
class ComparisonResult:
    """Every method's result on the same pairs."""

    methods: list[MethodResult]
    pairs: list[Pair]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if not methods:
        raise ValueError("methods is empty: nothing to compare")


def _score_pair(model, pair: Pair, device, metrics, result: MethodResult, first: bool) -> None:
    fixed, moving = pair.fixed_hu.to(device), pair.moving_hu.to(device)
    if first and device.type == "cuda":
        with torch.no_grad():
            model(fixed, moving)  # warm-up: CUDA context and kernels
    with torch.no_grad():
        ev = register_and_score(
            model,
            fixed,
            moving,
            spacing=pair.spacing,
            fixed_labels=pair.fixed_labels.to(device),
            moving_labels=pair.moving_labels.to(device),
            true_displacement=None if pair.true_disp is None else pair.true_disp.to(device),
            labels=metrics.labels,
        )
    metrics.add(pair.name, ev.scores[0])
    if first:
        disp = ev.displacement.float().cpu()
        result.first_moved = warp(pair.moving_hu, disp, padding_mode="border")[0, 0]


def run_comparison(
    methods: Sequence[str],
    pairs: Sequence[Pair],
    options: dict | None = None,
    voxelmorph_ckpt: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> ComparisonResult:
    """Run and score every method on every pair.

    Args:
        methods: keys of :data:`METHODS`, in table order.
        pairs: the pairs (all on one grid with one affine).
        options: per-method constructor overrides, ``{method key: {arg: value}}``; the key
            ``voxelopt`` applies to both VoxelOpt rows.
        voxelmorph_ckpt: checkpoint of a trained VoxelMorph (RegistrationModule or plain).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for the torch methods.
        threads: CPU threads for ANTs / elastix (``None``: their default).
        log: progress messages.

    Returns:
        :class:`ComparisonResult`; methods that could not be built carry ``skipped``.
    """
    check_methods(methods)
    if not pairs:
        raise ValueError("pairs is empty: nothing to compare")
    dev = _resolve_device(device)
    ctx = BuildContext(pairs[0].affine, dict(options or {}), voxelmorph_ckpt, threads, dev)
    results = []
    for key in methods:
        spec = METHODS[key]
        result = MethodResult(key, spec.label, spec.kind)
        results.append(result)
        try:
            model = spec.build(ctx)
        except (ImportError, FileNotFoundError) as exc:
            result.skipped = str(exc).splitlines()[0]
            log(f"[compare] {spec.label}: skipped ({result.skipped})")
            continue
        run_dev = torch.device("cpu") if spec.cpu_only else dev
        result.device = run_dev.type
        model = model.to(run_dev).eval()
        metrics = RegistrationMetrics(labels=tuple(BTCV13_LABELS))
        for k, pair in enumerate(pairs):
            _score_pair(model, pair, run_dev, metrics, result, first=k == 0)
            log(f"[compare] {spec.label} {pair.name}: {metrics.rows()[-1]['runtime_s']:.2f} s")
        result.rows = metrics.rows()
        result.summary = metrics.compute()
    return ComparisonResult(results, list(pairs))
