"""How much memory a registration will need, and whether the machine has it.

:func:`estimate_peak_bytes` adds up what each stage of :func:`voxelopt.pipeline.register_volumes`
holds at once, from per-voxel coefficients measured on this project's machine (2 cores,
resident set sampled every 5 ms; the commands are in BENCHMARKS.md). The inputs stay resident
for the whole run; the working-grid stages (features, solve, metrics) scale with the working
grid, the full-resolution ones (load, warp, write) with the file grids.
:func:`check_memory` compares the estimate with :func:`available_memory_bytes` before any heavy
work and stops with one line naming the option that makes it fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COEFFICIENTS",
    "MemoryEstimate",
    "available_memory_bytes",
    "check_memory",
    "check_registration_memory",
    "check_volumes_memory",
    "estimate_peak_bytes",
    "resident_inputs_bytes",
    "suggest_spacing",
]

#: Working spacings (mm) :func:`suggest_spacing` tries, finest first.
CANDIDATE_SPACINGS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)

#: Measured coefficients: bytes per voxel (``*_per_voxel``), per voxel and feature channel
#: (``*_per_channel``), or bytes (``*_bytes``).
COEFFICIENTS: dict[str, float] = {
    "base_bytes": 400e6,  # interpreter with torch, numpy, scipy, voxelopt (0.24 GB) and margin
    "load_image_per_voxel": 12.0,  # while an image loads: file dtype, float64, float32 result
    "load_labels_per_voxel": 18.0,  # while labels load: float64, integer check, int64 result
    "image_per_voxel": 4.0,  # a loaded image (float32)
    "labels_per_voxel": 8.0,  # a loaded label map (int64)
    "slab_bytes": 200e6,  # slab temporaries of resampling, warping and streaming writes
    # per working voxel above the loaded inputs (working images and labels included)
    "features_per_voxel": 57.0,  # raw: 81, MIND (12 channels): 348 bytes per voxel
    "features_per_channel": 24.0,
    "solve_per_voxel": 287.0,  # 5 levels; raw: 304, MIND: 490 bytes per voxel
    "solve_per_channel": 17.0,
    "metrics_per_voxel": 470.0,  # Jacobian in float64, per-label distance maps (HD95)
    "moved_per_voxel": 4.0,  # moved image (float32) on the fixed grid
    "moved_labels_per_voxel": 2.0,  # moved labels (compact integer dtype)
    # glibc keeps freed memory with keep_freed_memory() (the command line's default): its heap
    # fragments: measured peaks are 6-15 % above the stages' sums (512 x 512 x 133 and x 250)
    "fragmentation": 1.15,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated resident memory per stage.

    Attributes:
        stages: ``{stage: bytes}`` resident while each stage runs (inputs included).
        peak: the largest of them.
        peak_stage: the stage it happens in.
    """

    stages: dict[str, int]
    peak: int
    peak_stage: str

    def after_loading(self, resident: int) -> MemoryEstimate:
        """What the stages after ``load`` add to ``resident`` bytes already in memory."""
        stages = {k: v - int(resident) for k, v in self.stages.items() if k != "load"}
        peak_stage = max(stages, key=stages.get)
        return MemoryEstimate(stages, stages[peak_stage], peak_stage)


def _voxels(shape: Sequence[int], name: str) -> int:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be 3 positive sizes, got {shape}")
    return math.prod(shape)


def resident_inputs_bytes(
    fixed_shape: Sequence[int], moving_shape: Sequence[int], labels: bool = False
) -> int:
    """The process and its loaded inputs: what every stage of the estimate starts from."""
    c = COEFFICIENTS
    n = _voxels(fixed_shape, "fixed_shape") + _voxels(moving_shape, "moving_shape")
    per_voxel = c["image_per_voxel"] + (c["labels_per_voxel"] if labels else 0.0)
    return int(c["base_bytes"] + c["fragmentation"] * per_voxel * n)


def estimate_peak_bytes(
    fixed_shape: Sequence[int],
    moving_shape: Sequence[int],
    working_shape: Sequence[int],
    channels: int = 12,
    levels: int = 5,
    *,
    labels: bool = False,
    coefficients: dict[str, float] | None = None,
) -> MemoryEstimate:
    """Peak resident memory of a registration (see :func:`voxelopt.pipeline.register_volumes`).

    Args:
        fixed_shape: voxels of the fixed image (its file grid).
        moving_shape: voxels of the moving image.
        working_shape: voxels of the working grid.
        channels: feature channels (MIND: 12, raw: 1).
        levels: pyramid levels (coarser levels add up to 1/7 of the finest's cost).
        labels: whether both label maps are loaded, resampled and warped.
        coefficients: overrides of :data:`COEFFICIENTS`.

    Returns:
        :class:`MemoryEstimate`.
    """
    c = {**COEFFICIENTS, **(coefficients or {})}
    nf, nm = _voxels(fixed_shape, "fixed_shape"), _voxels(moving_shape, "moving_shape")
    nw = _voxels(working_shape, "working_shape")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    base = c["base_bytes"]
    images = c["image_per_voxel"] * (nf + nm)
    label_maps = c["labels_per_voxel"] * (nf + nm) if labels else 0.0
    inputs = images + label_maps
    pyramid = sum(8.0**-i for i in range(levels)) / sum(8.0**-i for i in range(5))
    working_inputs = (2 * 4.0 + (2 * 8.0 if labels else 0.0)) * nw
    transient = max(
        c["load_image_per_voxel"] - c["image_per_voxel"],
        c["load_labels_per_voxel"] - c["labels_per_voxel"] if labels else 0.0,
    )
    above = {
        "load": inputs + transient * max(nf, nm),
        "resample": inputs + working_inputs + c["slab_bytes"],
        "features": inputs + (c["features_per_voxel"] + c["features_per_channel"] * channels) * nw,
        "solve": inputs + pyramid * (c["solve_per_voxel"] + c["solve_per_channel"] * channels) * nw,
        "metrics": inputs + c["metrics_per_voxel"] * nw,
        "warp": inputs
        + (c["moved_per_voxel"] + (c["moved_labels_per_voxel"] if labels else 0.0)) * nf
        + c["slab_bytes"],
    }
    stages = {k: base + c["fragmentation"] * v for k, v in above.items()}
    stages["write"] = stages["warp"]
    out = {k: int(v) for k, v in stages.items()}
    peak_stage = max(out, key=out.get)
    return MemoryEstimate(stages=out, peak=out[peak_stage], peak_stage=peak_stage)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under the cgroup's memory limit (v2, then v1), ``None`` without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(root / limit_file)
        if limit is None or limit >= 1 << 60:  # "max" or v1's "no limit" sentinel
            continue
        usage = _read_int(root / usage_file) or 0
        return max(0, limit - usage)
    return None


def available_memory_bytes(
    meminfo: str | Path = "/proc/meminfo", cgroup_root: str | Path = "/sys/fs/cgroup"
) -> int | None:
    """Memory this process can still use: ``MemAvailable``, capped by a cgroup limit.

    Args:
        meminfo: the ``/proc/meminfo`` file (tests pass another).
        cgroup_root: the cgroup file system's mount point.

    Returns:
        Bytes, or ``None`` where neither source can be read (other platforms).
    """
    available = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        available = None
    cgroup = _cgroup_free(Path(cgroup_root))
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(
    estimate: MemoryEstimate,
    available: int | None = None,
    *,
    fits_with: str | None = None,
) -> None:
    """Raise a one-line ``ValueError`` when the estimate exceeds the memory available.

    Args:
        estimate: from :func:`estimate_peak_bytes`.
        available: bytes available (default: :func:`available_memory_bytes`; nothing is
            checked where that is unknown).
        fits_with: the option that makes the run fit, e.g. ``"--spacing 3"`` (see
            :func:`suggest_spacing`); ``None`` when no working grid would fit.

    Raises:
        ValueError: ``"needs about X GB (stage) but Y GB are available; use --spacing 3"``.
    """
    if available is None:
        available = available_memory_bytes()
    if available is None or estimate.peak <= available:
        return
    fix = f"use {fits_with}" if fits_with else "free memory or use smaller images"
    raise ValueError(
        f"registration needs about {_gb(estimate.peak)} of memory ({estimate.peak_stage} "
        f"stage) but only {_gb(available)} is available; {fix}"
    )


def _working_shape(shape, spacing_mm, spacing, budget_voxels) -> tuple[int, int, int]:
    from voxelopt.grid import _grid_size, working_spacing

    target = working_spacing(shape, spacing_mm, spacing, budget_voxels)
    return tuple(
        _grid_size(int(n), float(o), t) for n, o, t in zip(shape, spacing_mm, target, strict=True)
    )


def suggest_spacing(
    fixed_shape: Sequence[int],
    fixed_spacing: Sequence[float],
    moving_shape: Sequence[int],
    available: int,
    **estimate_kw,
) -> float | None:
    """The finest of :data:`CANDIDATE_SPACINGS` whose estimate fits in ``available`` bytes.

    Args:
        fixed_shape: voxels of the fixed image (any axis order, with ``fixed_spacing`` in it).
        fixed_spacing: its voxel size in mm.
        moving_shape: voxels of the moving image.
        available: bytes available.
        **estimate_kw: ``channels``, ``levels``, ``labels`` of :func:`estimate_peak_bytes`.

    Returns:
        The spacing in mm, or ``None`` when even the coarsest does not fit.
    """
    for s in CANDIDATE_SPACINGS:
        working = _working_shape(fixed_shape, fixed_spacing, s, 8)
        if estimate_peak_bytes(fixed_shape, moving_shape, working, **estimate_kw).peak <= available:
            return s
    return None


def check_registration_memory(
    fixed_shape: Sequence[int],
    fixed_spacing: Sequence[float],
    moving_shape: Sequence[int],
    *,
    spacing: str | float = "auto",
    budget_voxels: int | None = None,
    available: int | None = None,
    option: str = "--spacing",
    **estimate_kw,
) -> MemoryEstimate:
    """Estimate a registration's memory from the image headers; stop if it cannot fit.

    Args:
        fixed_shape: voxels of the fixed image (file or RAS+ order, as ``fixed_spacing``).
        fixed_spacing: its voxel size in mm.
        moving_shape: voxels of the moving image.
        spacing: the working spacing option (``"auto"`` or mm).
        budget_voxels: voxel budget of ``"auto"`` (default
            :data:`voxelopt.grid.DEFAULT_VOXEL_BUDGET`).
        available: bytes available (default :func:`available_memory_bytes`).
        option: how the spacing option is spelled in the message.
        **estimate_kw: ``channels``, ``levels``, ``labels`` of :func:`estimate_peak_bytes`.

    Returns:
        The :class:`MemoryEstimate` (when it fits).

    Raises:
        ValueError: one line naming the spacing that would fit, e.g. ``use --spacing 3``.
    """
    from voxelopt.grid import DEFAULT_VOXEL_BUDGET

    budget = DEFAULT_VOXEL_BUDGET if budget_voxels is None else budget_voxels
    working = _working_shape(fixed_shape, fixed_spacing, spacing, budget)
    estimate = estimate_peak_bytes(fixed_shape, moving_shape, working, **estimate_kw)
    if available is None:
        available = available_memory_bytes()
    if available is None or estimate.peak <= available:
        return estimate
    fit = suggest_spacing(fixed_shape, fixed_spacing, moving_shape, available, **estimate_kw)
    check_memory(estimate, available, fits_with=f"{option} {fit:g}" if fit is not None else None)
    return estimate


def check_volumes_memory(fixed, moving, grid, model, labels: bool) -> None:
    """Raise ``ValueError`` when the stages of :func:`voxelopt.pipeline.register_volumes`
    after loading will not fit in memory (one line naming a ``spacing`` that fits).

    Args:
        fixed, moving: the loaded :class:`~voxelopt.io.Volume` images.
        grid: the working grid.
        model: the :class:`~voxelopt.VoxelOptRegistration` (its extractor's channels and levels).
        labels: whether label maps come along.
    """
    available = available_memory_bytes()
    if available is None:
        return
    kw = {
        "channels": int(getattr(model.extractor, "out_channels", 12)),
        "levels": model.config.levels,
        "labels": labels,
    }
    resident = resident_inputs_bytes(fixed.shape, moving.shape, labels)
    est = estimate_peak_bytes(fixed.shape, moving.shape, grid.shape, **kw).after_loading(resident)
    fit = suggest_spacing(fixed.shape, fixed.spacing, moving.shape, available + resident, **kw)
    check_memory(est, available, fits_with=f"spacing={fit:g}" if fit is not None else None)
