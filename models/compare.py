"""Compare registration methods on the same pairs with the same metric code (paper Table 1).

``python compare.py -c configs/compare.yaml`` runs every requested method (Initial = identity,
VoxelOpt with MIND / OBELISK features, ConvexAdam, VoxelMorph from a checkpoint, ANTs SyN,
elastix B-spline) on the same synthetic pairs (known smooth deformations of the shared CT, or
of the phantom), scores each with :class:`voxelopt.metrics.RegistrationMetrics`, and writes

* ``<output_dir>/compare.md``: the table (method, type, Dice, HD95, SDlogJ, non-positive
  Jacobians, endpoint error, median runtime) and the methods that were skipped, with why;
* ``<output_dir>/compare.png``: one coronal slice per method and a box plot of Dice per organ;
* ``<output_dir>/pairs.csv``: every score of every pair and method.

A method that cannot run (package not installed, weights or checkpoint absent) is listed as
skipped with the reason, never dropped silently. The endpoint error is averaged inside the
body (fixed image above ``models.registration.BODY_HU``), as in training and evaluation.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from models.registration import BODY_HU
from voxelopt.allocator import configure_from_environment
from voxelopt.metrics import BTCV13_LABELS, RegistrationMetrics, write_pair_csv
from voxelopt.transform import resize_displacement, resize_volume, warp

__all__ = [
    "METHODS",
    "ComparisonResult",
    "Identity",
    "MethodResult",
    "Pair",
    "Resampled",
    "build_parser",
    "main",
    "make_pairs",
    "run_comparison",
    "write_outputs",
]

DEFAULT_METHODS = (
    "initial",
    "voxelopt_mind",
    "voxelopt_obelisk",
    "convex_adam",
    "voxelmorph",
    "ants",
    "elastix",
)


class Identity(nn.Module):
    """The "Initial" row: the zero displacement."""

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        b, _, *shape = fixed_hu.shape
        return fixed_hu.new_zeros(b, 3, *shape)


class Resampled(nn.Module):
    """Run ``model`` on images ``factor`` times coarser, return its field on the input grid.

    For a network trained at another resolution (VoxelMorph trained at ~6 mm, compared at
    3 mm): each size ``n`` becomes ``n // factor`` by corner-aligned trilinear resampling, the
    same as :func:`models.data.prepare_volume`'s ``downsample``; the displacement is resampled
    back and rescaled to voxels of the input grid.
    """

    def __init__(self, model: nn.Module, factor: int) -> None:
        super().__init__()
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"input_downsample must be an integer >= 1, got {factor!r}")
        self.model = model
        self.factor = factor

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        shape = fixed_hu.shape[2:]
        if self.factor == 1:
            return self.model(fixed_hu, moving_hu)
        coarse = [max(n // self.factor, 2) for n in shape]
        disp = self.model(resize_volume(fixed_hu, coarse), resize_volume(moving_hu, coarse))
        return resize_displacement(disp, shape)


@dataclass
class Pair:
    """One registration pair on a common grid (``fixed(x) = moving(x + true_disp(x))``)."""

    name: str
    fixed_hu: Tensor
    moving_hu: Tensor
    fixed_labels: Tensor
    moving_labels: Tensor
    true_disp: Tensor | None
    spacing: tuple[float, float, float]
    affine: np.ndarray


@dataclass
class BuildContext:
    """What method builders may use: the pairs' affine, options, checkpoint, device."""

    affine: np.ndarray
    options: dict
    voxelmorph_ckpt: str | None
    threads: int | None
    device: torch.device


# --------------------------------------------------------------------------- methods
def _opts(ctx: BuildContext, key: str) -> dict:
    value = ctx.options.get(key, {}) or {}
    if not isinstance(value, dict):
        raise ValueError(f"options.{key} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _voxelopt(extractor: str) -> Callable[[BuildContext], nn.Module]:
    def build(ctx: BuildContext) -> nn.Module:
        from voxelopt.registration import VoxelOptRegistration

        kwargs = _opts(ctx, "voxelopt") | _opts(ctx, f"voxelopt_{extractor}")
        return VoxelOptRegistration(extractor, **kwargs)

    return build


def _convex_adam(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.convex_adam import ConvexAdam

    return ConvexAdam(**_opts(ctx, "convex_adam"))


def _voxelmorph(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.voxelmorph import VoxelMorph

    if not ctx.voxelmorph_ckpt:
        raise FileNotFoundError(
            "no checkpoint given (--voxelmorph_ckpt; train one with "
            "configs/baseline_voxelmorph_semisup.yaml)"
        )
    path = Path(ctx.voxelmorph_ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"VoxelMorph checkpoint not found: {path}")
    kwargs = _opts(ctx, "voxelmorph")
    factor = kwargs.pop("input_downsample", 1)  # the training data's grid reduction
    model = VoxelMorph(**kwargs)
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    prefix = "model."  # RegistrationModule keeps the registration model under .model
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return Resampled(model, factor).eval()


def _ants(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.ants import AntsSyN, ants_available

    ok, reason = ants_available()
    if not ok:
        raise ImportError(reason)
    return AntsSyN(ctx.affine, **({"threads": ctx.threads} | _opts(ctx, "ants")))


def _elastix(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.elastix import ElastixBSpline, elastix_available

    ok, reason = elastix_available()
    if not ok:
        raise ImportError(reason)
    return ElastixBSpline(ctx.affine, **({"threads": ctx.threads} | _opts(ctx, "elastix")))


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: display name, kind of method, builder, and whether it runs on CPU."""

    label: str
    kind: str
    build: Callable[[BuildContext], nn.Module]
    cpu_only: bool = False


METHODS: dict[str, MethodSpec] = {
    "initial": MethodSpec("Initial", "-", lambda ctx: Identity()),
    "voxelopt_mind": MethodSpec("VoxelOpt (MIND)", "discrete, zero-shot", _voxelopt("mind")),
    "voxelopt_obelisk": MethodSpec(
        "VoxelOpt (OBELISK)", "discrete, pretrained features", _voxelopt("obelisk")
    ),
    "convex_adam": MethodSpec("ConvexAdam", "discrete + instance opt.", _convex_adam),
    "voxelmorph": MethodSpec("VoxelMorph", "learning", _voxelmorph),
    "ants": MethodSpec("ANTs SyN", "iterative", _ants, cpu_only=True),
    "elastix": MethodSpec("elastix B-spline", "iterative", _elastix, cpu_only=True),
}


# --------------------------------------------------------------------------- pairs
def make_pairs(
    source: Literal["ct", "phantom"] = "ct",
    seeds: Sequence[int] = (0, 1, 2),
    downsample: int = 1,
    max_displacement_mm: float = 15.0,
    control_spacing_mm: float = 40.0,
    phantom_shape: Sequence[int] = (48, 40, 56),
    phantom_spacing: float = 6.0,
) -> list[Pair]:
    """Synthetic pairs by known smooth deformations (:func:`voxelopt.phantom.make_pair`).

    Args:
        source: ``"ct"`` (the shared real CT with its 13-organ labels) or ``"phantom"``.
        seeds: one pair per seed.
        downsample: integer downsampling of the shared CT (3 mm -> ``3 * downsample`` mm).
        max_displacement_mm: largest displacement of each true field (mm).
        control_spacing_mm: control-point spacing of the random fields (mm).
        phantom_shape: ``(D, H, W)`` of the phantom (``source="phantom"``).
        phantom_spacing: voxel size of the phantom (mm).

    Returns:
        One :class:`Pair` per seed.
    """
    from voxelopt.phantom import load_abdomen_ct, make_pair, make_phantom

    if not seeds:
        raise ValueError("seeds must name at least one pair")
    if source == "ct":
        ct, lab = load_abdomen_ct(downsample)
        images = {s: (ct.data, lab.data) for s in seeds}
        spacing, affine = ct.spacing, ct.affine
    elif source == "phantom":
        spacing = (float(phantom_spacing),) * 3
        images = {s: make_phantom(phantom_shape, phantom_spacing, seed=s) for s in seeds}
        affine = np.diag([*spacing, 1.0])
    else:
        raise ValueError(f"source must be 'ct' or 'phantom', got {source!r}")
    pairs = []
    for s in seeds:
        hu, labels = images[s]
        p = make_pair(
            hu,
            labels,
            max_displacement_mm,
            spacing,
            seed=int(s),
            control_spacing_mm=control_spacing_mm,
        )
        pairs.append(
            Pair(
                name=f"{source}_seed{s}",
                fixed_hu=p.fixed_hu,
                moving_hu=p.moving_hu,
                fixed_labels=p.fixed_labels,
                moving_labels=p.moving_labels,
                true_disp=p.displacement,
                spacing=tuple(float(v) for v in p.spacing),
                affine=np.asarray(affine, dtype=np.float64),
            )
        )
    return pairs


# --------------------------------------------------------------------------- running
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


def _timed(model: nn.Module, fixed: Tensor, moving: Tensor) -> tuple[Tensor, float]:
    sync = fixed.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(fixed.device)
    start = time.perf_counter()
    with torch.no_grad():
        disp = model(fixed, moving)
    if sync:
        torch.cuda.synchronize(fixed.device)
    return disp, time.perf_counter() - start


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if not methods:
        raise ValueError("methods is empty: nothing to compare")


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
    _check_methods(methods)
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
            fixed, moving = pair.fixed_hu.to(run_dev), pair.moving_hu.to(run_dev)
            if k == 0 and run_dev.type == "cuda":
                _timed(model, fixed, moving)  # warm-up: CUDA context and kernels
            disp, seconds = _timed(model, fixed, moving)
            disp = disp.detach().float().cpu()
            moved_labels = warp(pair.moving_labels, disp, mode="nearest")
            metrics.update(
                [pair.name],
                moved_labels,
                pair.fixed_labels,
                disp,
                pair.true_disp,
                seconds,
                spacing=pair.spacing,
                # as in RegistrationModule: the EPE inside the body only (outside, the
                # synthetic field moves nothing visible and no method can recover it)
                epe_mask=pair.fixed_hu > BODY_HU,
            )
            if k == 0:
                result.first_moved = warp(pair.moving_hu, disp, padding_mode="border")[0, 0]
            log(f"[compare] {spec.label} {pair.name}: {seconds:.2f} s")
        result.rows = metrics.rows()
        result.summary = metrics.compute()
    return ComparisonResult(results, list(pairs))


# --------------------------------------------------------------------------- outputs
def _fmt(value: float, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def _mean_std(rows: list[dict], key: str, scale: float = 1.0, digits: int = 2) -> str:
    values = [r[key] for r in rows if not math.isnan(r[key])]
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown_table(result: ComparisonResult) -> str:
    """The comparison as Markdown: the table, then the skipped methods and their reasons."""
    head = (
        "| method | type | Dice (%) | HD95 (mm) | SDlogJ | SDlogJ (plain) | "
        "non-pos. J (%) | EPE (mm) | runtime median (s) | device |"
    )
    lines = [head, "| " + " | ".join(["---"] * 10) + " |"]
    for m in result.methods:
        if m.skipped:
            continue
        s, r = m.summary, m.rows
        lines.append(
            f"| {m.label} | {m.kind} | {_mean_std(r, 'dice', 100)} | {_mean_std(r, 'hd95')} | "
            f"{_fmt(s['sdlogj_l2r'], 3)} | {_fmt(s['sdlogj'], 3)} | "
            f"{_fmt(s['nonpositive_jacobian'], 3, 100)} | {_fmt(s['epe_mm'])} | "
            f"{_fmt(m.runtime_median)} | {m.device} |"
        )
    skipped = [m for m in result.methods if m.skipped]
    if skipped:
        lines += ["", "Skipped:"]
        lines += [f"- {m.label}: {m.skipped}" for m in skipped]
    return "\n".join(lines) + "\n"


def write_outputs(result: ComparisonResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.md``, ``pairs.csv`` and ``compare.png`` into ``output_dir``.

    Returns:
        ``{"markdown": path, "csv": path, "figure": path}`` (figure absent when no method ran).
    """
    from voxelopt.io import atomic_output

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with atomic_output(out / "compare.md") as tmp:
        tmp.write_text(markdown_table(result))
    paths["markdown"] = out / "compare.md"
    ran = [m for m in result.methods if not m.skipped]
    rows = [{"method": m.key, **r} for m in ran for r in m.rows]
    if rows:
        paths["csv"] = write_pair_csv(rows, out / "pairs.csv")
        paths["figure"] = _figure(result, ran, out / "compare.png")
    return paths


def _figure(result: ComparisonResult, ran: list[MethodResult], path: Path) -> Path:
    from voxelopt.visualize import save_comparison_figure

    first = result.pairs[0]
    moved = {m.label: m.first_moved.numpy() for m in ran}
    dice_per_organ = {
        m.label: {
            lab: [r[f"dice_{lab}"] for r in m.rows if not math.isnan(r[f"dice_{lab}"])]
            for lab in BTCV13_LABELS
        }
        for m in ran
    }
    return save_comparison_figure(
        path,
        first.fixed_hu[0, 0].numpy(),
        moved,
        dice_per_organ,
        label_names=BTCV13_LABELS,
        axis=1,
        spacing=first.spacing,
    )


# --------------------------------------------------------------------------- command line
def build_parser():
    """The ``compare.py`` argument parser (jsonargparse; ``-c`` reads a YAML config)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config")
    p.add_argument("--methods", type=list[str], default=list(DEFAULT_METHODS))
    p.add_argument("--source", type=Literal["ct", "phantom"], default="ct")
    p.add_argument("--seeds", type=list[int], default=[0, 1, 2])
    p.add_argument("--downsample", type=int, default=1, help="shared CT downsampling")
    p.add_argument("--max_displacement_mm", type=float, default=15.0)
    p.add_argument("--control_spacing_mm", type=float, default=40.0)
    p.add_argument("--phantom_shape", type=list[int], default=[48, 40, 56])
    p.add_argument("--phantom_spacing", type=float, default=6.0)
    p.add_argument("--voxelmorph_ckpt", type=str | None, default=None)
    p.add_argument("--options", type=dict, default={}, help="{method: {constructor args}}")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--threads", type=int | None, default=None, help="ANTs/elastix threads")
    p.add_argument("--output_dir", type=str, default="runs/compare")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``compare.py``; bad input exits with code 2 and a one-line message."""
    args = build_parser().parse_args(argv)
    configure_from_environment()
    try:
        _check_methods(args.methods)
        pairs = make_pairs(
            args.source,
            args.seeds,
            args.downsample,
            args.max_displacement_mm,
            args.control_spacing_mm,
            args.phantom_shape,
            args.phantom_spacing,
        )
        result = run_comparison(
            args.methods,
            pairs,
            args.options,
            args.voxelmorph_ckpt,
            args.device,
            args.threads,
        )
        paths = write_outputs(result, args.output_dir)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(result))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
