"""Fused CPU kernels for the solver's inference hot path, and when to use them.

The torch operators of :mod:`voxelopt.cost`, :mod:`voxelopt.entropy`, :mod:`voxelopt.filtering`,
:mod:`voxelopt.solver` and :mod:`voxelopt.transform` stay the reference, the autograd path
(soft argmin, training) and the GPU path. On CPU each of them is a chain of small ATen
operators (each a pass over memory and a wake-up of the thread pool); the kernels here do each
step in one parallel pass, compiled by numba:

=======================  =========================================================  ===========
step                     kernel                                                     vs torch
=======================  =========================================================  ===========
cost volume (+ entropy)  :func:`cost_volume`, :func:`cost_and_entropy`              bit for bit
entropy                  :func:`displacement_entropy` (27 exp, 2 log a voxel)       rounding
sigma map, side weight   :func:`sigma_and_weight`                                   rounding
smoothing (all passes)   :func:`smooth`                                             bit for bit
hard (coupled) argmin    :func:`hard_argmin`, the same tie-breaking                 bit for bit
trilinear sampling       :func:`warp`, :func:`compose`, :func:`integrate_velocity`  bit for bit
sampling at positions    :func:`grid_sample` (trilinear or nearest, zero padding)   bit for bit
MIND-SSC features        :func:`mind_ssc` (two passes instead of ~30)               rounding
offsets outside data     :func:`mask_offsets` (one pass instead of ~300 operators)  bit for bit
Gaussian (anti-aliasing) :func:`gaussian_filter1d` (scipy's, in parallel)           bit for bit
=======================  =========================================================  ===========

("bit for bit": measured on this project's machines, where torch's vectorised ``lerp`` and
``add`` are fused multiply-adds as here; "rounding": a few float32 ulps, from a different
``exp``/``log``.) Every function here takes and returns float32 CPU tensors
and records no gradient; :func:`use_numba` says when a backend setting selects them. numba is
imported on the first call of a kernel, not with this package; compiled kernels are cached on
disk (``cache=True``), so only the very first use on a machine pays the compilation.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "COMPILE_MESSAGE",
    "compile_notice",
    "compose",
    "cost_and_entropy",
    "cost_volume",
    "displacement_entropy",
    "gaussian_filter1d",
    "grid_sample",
    "hard_argmin",
    "integrate_velocity",
    "mask_offsets",
    "mind_ssc",
    "numba_available",
    "sigma_and_weight",
    "smooth",
    "unsupported",
    "use_numba",
    "warm_up",
    "warp",
]

#: ``"auto"``: numba where it applies (CPU, float32, no gradient recorded), torch elsewhere.
BACKENDS = ("auto", "torch", "numba")

#: Voxels per work item of the entropy kernels (``_entropy.BLOCK``, kept here so that this
#: module does not import numba).
_ENTROPY_BLOCK = 512


@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    return importlib.util.find_spec("numba") is not None


def unsupported(*tensors: Tensor | None) -> str | None:
    """Why the numba kernels cannot take these tensors, or ``None`` when they can."""
    if not numba_available():
        return "needs the numba package (pip install numba)"
    recording = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"runs on CPU only, got a tensor on {t.device}"
        if t.dtype != torch.float32:
            return f"needs float32 tensors, got {t.dtype}"
        if recording and t.requires_grad:
            return "records no gradients; a tensor requires grad (use backend='torch')"
    return None


def use_numba(backend: str, *tensors: Tensor | None) -> bool:
    """Whether an operator with this ``backend`` setting runs the numba kernel on ``tensors``.

    Args:
        backend: ``"torch"`` (never), ``"numba"`` (always; raises where it cannot) or
            ``"auto"`` (where :func:`unsupported` finds nothing against it).
        *tensors: the operator's tensor inputs (``None`` entries are skipped).

    Raises:
        ValueError: unknown ``backend``, or ``"numba"`` for tensors it cannot take.
    """
    if backend == "torch":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    reason = unsupported(*tensors)
    if reason is not None and backend == "numba":
        raise ValueError(f"backend='numba' {reason}")
    return reason is None


def warm_up(background: bool = False) -> threading.Thread | None:
    """Import numba and load (or, the first time on a machine, compile) every kernel now.

    A tiny solve on the kernels; the first real solve then starts at once. In a background
    thread it overlaps with whatever the caller does next (reading images, features); kernels
    and compilation are serialised, so a solve that starts meanwhile is merely delayed.

    Args:
        background: run in a daemon thread and return it (``None`` without numba).

    Returns:
        The thread when ``background``, else ``None``.
    """
    if not numba_available():
        return None
    if background:
        thread = threading.Thread(target=warm_up, name="voxelopt-kernels", daemon=True)
        thread.start()
        return thread
    from voxelopt.pyramid import VoxelOpt

    fixed = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        VoxelOpt(levels=2, backend="numba")(fixed, fixed.flip(2))
    return None


def _array(t: Tensor):
    """The numpy view of a float32 CPU tensor (a contiguous copy only when it is strided)."""
    return t.detach().contiguous().numpy()


#: One kernel at a time per process: each uses every thread already, and numba's workqueue
#: threading layer (see ``_runtime``) must not be entered from two threads at once.
_LOCK = threading.Lock()
#: Kernel modules whose cache was checked against the sources in this process.
_CHECKED: set[str] = set()
_NOTIFIED: list[str] = []

#: Called with :data:`COMPILE_MESSAGE` when the first kernel of a process is about to be
#: compiled rather than loaded from numba's cache (the first use on a machine); the command
#: line shows it as a progress line. ``None``: silent.
compile_notice: Callable[[str], None] | None = None
COMPILE_MESSAGE = (
    "compiling the CPU kernels for this machine (once, about 25 s; later runs load them from "
    "numba's cache)"
)


def _call(module: str, kernel: str, *args):
    """``voxelopt.kernels._<module>.<kernel>(*args)`` on as many threads as torch uses.

    The first call imports numba and the kernel module, and loads (or, on a machine without
    numba's cache of it, compiles) the kernel.
    """
    with _LOCK:
        runtime = importlib.import_module("voxelopt.kernels._runtime")
        runtime.set_threads()
        found = importlib.import_module(f"voxelopt.kernels._{module}")
        if module not in _CHECKED:
            _CHECKED.add(module)
            if runtime.drop_stale_cache(found) and not _NOTIFIED and compile_notice is not None:
                _NOTIFIED.append(module)  # once per process
                compile_notice(COMPILE_MESSAGE)
        return getattr(found, kernel)(*args)


def cost_volume(fixed: Tensor, moving: Tensor, kernel_size: int) -> Tensor:
    """:func:`voxelopt.cost.cost_volume` in one pass: ``(B, C, D, H, W)`` twice ->
    ``(B, (2k+1)^3, D, H, W)``."""
    return _cost_volume(fixed, moving, kernel_size, None)[0]


def cost_and_entropy(
    fixed: Tensor, moving: Tensor, kernel_size: int, beta: float, prob_floor: float
) -> tuple[Tensor, Tensor]:
    """:func:`cost_volume` and :func:`displacement_entropy` of it in one pass: the entropy
    of a plane is taken while its costs are still in cache.

    Returns:
        ``(cost, entropy)``: ``(B, K, D, H, W)`` and ``(B, 1, D, H, W)``.
    """
    return _cost_volume(fixed, moving, kernel_size, (beta, prob_floor))


def _cost_volume(fixed, moving, kernel_size, entropy_args) -> tuple[Tensor, Tensor | None]:
    from voxelopt.cost import search_offsets

    offsets = search_offsets(kernel_size).long()
    b, c = fixed.shape[:2]
    out = fixed.new_empty((b, offsets.shape[0], *fixed.shape[2:]))
    entropy, scale, floor = None, _f32(1.0), _f32(0.5)
    target = np.zeros((0, 0), dtype=np.float32)
    if entropy_args is not None:
        entropy = fixed.new_empty((b, 1, *fixed.shape[2:]))
        scale, floor = _f32(-1.0 / entropy_args[0]), _f32(entropy_args[1])
        target = entropy.numpy().reshape(b, -1)
    arrays = _array(fixed), _array(moving), offsets.numpy()
    _call("cost", "cost_volume", *arrays, _f32(1.0 / c), out.numpy(), scale, floor, target)
    return out, entropy


def displacement_entropy(cost: Tensor, beta: float, prob_floor: float) -> Tensor:
    """:func:`voxelopt.entropy.displacement_entropy`: ``(B, K, D, H, W)`` ->
    ``(B, 1, D, H, W)`` nats."""
    b, k = cost.shape[:2]
    out = cost.new_empty((b, 1, *cost.shape[2:]))
    source = _array(cost).reshape(b, k, -1)
    scale, floor = _f32(-1.0 / beta), _f32(prob_floor)
    _call("entropy", "entropy", source, scale, floor, out.numpy().reshape(b, -1))
    return out


def sigma_and_weight(
    entropy: Tensor, mode: str, sigma_low: float, sigma_high: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """:func:`voxelopt.entropy.sigma_map` and :func:`voxelopt.filtering.side_weight` of it.

    Returns:
        ``(sigma, weight)``, both ``(B, 1, D, H, W)``.
    """
    if mode not in ("reference", "paper"):
        raise ValueError(f"mode must be 'reference' or 'paper', got {mode!r}")
    b = entropy.shape[0]
    values = _array(entropy).reshape(b, -1)
    blocks = -(-values.shape[1] // _ENTROPY_BLOCK)
    low = torch.empty((b, blocks))
    high = torch.empty((b, blocks))
    _call("entropy", "extremes", values, low.numpy(), high.numpy())
    sigma = torch.empty_like(entropy, memory_format=torch.contiguous_format)
    weight = torch.empty_like(sigma)
    _call(
        "entropy",
        "sigma_weight",
        values,
        low.amin(dim=1).numpy(),
        high.amax(dim=1).numpy(),
        mode == "paper",
        _f32(sigma_low),
        _f32(sigma_high - sigma_low),
        _f32(alpha),
        sigma.numpy().reshape(b, -1),
        weight.numpy().reshape(b, -1),
    )
    return sigma, weight


def smooth(
    x: Tensor,
    weight: Tensor | float,
    iterations: int,
    inplace: bool = False,
    out: Tensor | None = None,
) -> Tensor | None:
    """:func:`voxelopt.filtering.smooth` (graph-free path) in one sweep, bit for bit.

    Args:
        x: ``(B, C, D, H, W)``.
        weight: side weight in ``[0, 0.5)`` (a Gaussian's is below 1/3), a float or a
            ``(B or 1, 1, D, H, W)`` map.
        iterations: number of smoothings.
        inplace: allow writing the result into ``x``. Done for many channels (a
            contiguous cost volume); a displacement field gets a new tensor.
        out: a contiguous float32 tensor of ``x``'s shape, not overlapping it, for the result
            (instead of a new one); ignored when the result goes into ``x``.

    Returns:
        ``(B, C, D, H, W)`` smoothed, or ``None`` (nothing done) for a weight outside
        ``[0, 0.5)``, which the kernel's rounding of ``lerp`` does not cover.
    """
    if iterations == 0:
        return x
    b, c, d = x.shape[:3]
    shape = (b, 1, *x.shape[2:])
    if isinstance(weight, Tensor):
        weight = _array(weight.expand(shape))
        # numpy's vectorised reductions (a NaN fails both): 0.3 ms for a million weights
        if not (weight.min() >= 0.0 and weight.max() < 0.5):
            return None
    elif 0.0 <= weight < 0.5:
        weight = torch.full(shape, weight, dtype=x.dtype).numpy()
    else:
        return None
    # work items are channels, or for few channels (displacement fields) slabs of them, so
    # that every thread gets two or more
    threads = torch.get_num_threads()
    slabs = max(1, min(-(-2 * threads // (b * c)), d // (2 * iterations)))
    if slabs == 1 and inplace and x.is_contiguous():
        out = x  # in place: the kernel copies each plane before it overwrites it
    elif out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _call("smooth", "smooth", _array(x), out.numpy(), weight, iterations, slabs)
    return out


def hard_argmin(
    cost: Tensor,
    offsets: Tensor,
    u: Tensor | None = None,
    gamma: float = 0.0,
    exact_if_negative: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`voxelopt.solver.hard_argmin` in one pass, with the same tie-breaking.

    Args:
        cost: ``(B, K, D, H, W)`` cost.
        offsets: ``(K, 3)`` offsets in voxels.
        u: ``(B, 3, D, H, W)`` current field, or ``None`` for the plain argmin.
        gamma: coupling weight (ignored without ``u``).
        exact_if_negative: for the plain argmin of a cost with a negative entry, take the
            first exact minimum (as :func:`voxelopt.solver.offset_argmin` does).
        out: a contiguous float32 ``(B, 3, D, H, W)`` tensor for the result, not overlapping
            ``u`` (default: a new one).

    Returns:
        ``(B, 3, D, H, W)`` float32 offsets (``out`` when given).
    """
    b, k = cost.shape[:2]
    coupled = u is not None and gamma != 0.0
    mask = (1 << (k - 1).bit_length()) - 1 if k <= 32 else 0
    field = _array(u) if coupled else _array(cost.new_zeros((1, 3, 1, 1, 1)))
    if out is None:
        out = cost.new_empty((b, 3, *cost.shape[2:]))
    source, table = _array(cost), _array(offsets.to(torch.float32))
    negative = torch.zeros(b * cost.shape[2], dtype=torch.uint8)
    args = (source, field, _f32(gamma), coupled, table)
    _call("argmin", "hard_argmin", *args, mask, out.numpy(), negative.numpy())
    if mask and exact_if_negative and not coupled and bool(negative.any()):
        _call("argmin", "hard_argmin", *args, 0, out.numpy(), negative.numpy())
    return out


def warp(image: Tensor, disp: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Trilinear :func:`voxelopt.transform.warp` (zero or border padding) in one pass.

    Args:
        image: ``(B or 1, C, D, H, W)``.
        disp: ``(B, 3, D, H, W)`` in voxels.
        padding_mode: ``"zeros"`` or ``"border"``.

    Returns:
        ``(B, C, D, H, W)``: ``image(x + disp(x))``.
    """
    out = image.new_empty((disp.shape[0], image.shape[1], *disp.shape[2:]))
    arrays = _array(image), _array(disp), _scales(disp)
    _call("warp", "sample", *arrays, _border(padding_mode), False, out.numpy())
    return out


def grid_sample(image: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
    """``F.grid_sample(image[None, None], grid[None], mode, padding_mode="zeros",
    align_corners=True)[0, 0]`` in one pass, bit for bit.

    Args:
        image: ``(D, H, W)`` float32.
        grid: ``(D', H', W', 3)`` float32 normalised positions, ``(x, y, z)`` order.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.

    Returns:
        ``(D', H', W')`` float32.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    out = image.new_empty(grid.shape[:3])
    arrays = _array(image), _array(grid)
    _call("warp", "sample_grid", *arrays, mode == "nearest", out.numpy())
    return out


def compose(first: Tensor, second: Tensor, padding_mode: str = "border") -> Tensor:
    """:func:`voxelopt.transform.compose` in one pass: ``first + second(x + first(x))``."""
    out = torch.empty_like(first, memory_format=torch.contiguous_format)
    arrays = _array(second), _array(first), _scales(first)
    _call("warp", "sample", *arrays, _border(padding_mode), True, out.numpy())
    return out


def integrate_velocity(velocity: Tensor, steps: int, padding_mode: str = "border") -> Tensor:
    """:func:`voxelopt.transform.integrate_velocity`, one pass per squaring."""
    phi = (velocity / (2**steps)).contiguous()
    if steps == 0:
        return phi
    border, scales = _border(padding_mode), _scales(phi)
    target = torch.empty_like(phi)
    for _ in range(steps):
        _call("warp", "sample", phi.numpy(), phi.numpy(), scales, border, True, target.numpy())
        phi, target = target, phi
    return phi


def gaussian_filter1d(block: np.ndarray, sigma: float, axis: int, truncate: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d(block, sigma, axis, mode="nearest",
    truncate=truncate, output=np.float32)`` of a float32 array, on every thread, bit for bit.

    Args:
        block: float32 array of any dimension and layout.
        sigma: standard deviation in voxels (> 0).
        axis: the axis filtered.
        truncate: the kernel's half-width in sigmas (radius ``int(truncate sigma + 0.5)``).

    Returns:
        A new float32 array of ``block``'s shape.
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x**2)  # scipy's weights, exactly
    half = np.ascontiguousarray((phi / phi.sum())[radius:])
    axis = axis % block.ndim
    if not block.flags.c_contiguous and block.flags.f_contiguous:
        return gaussian_filter1d(block.T, sigma, block.ndim - 1 - axis, truncate).T
    source = np.ascontiguousarray(block, dtype=np.float32)
    shape = source.shape
    lines = source.reshape(int(np.prod(shape[:axis], dtype=np.int64)), shape[axis], -1)
    out = np.empty_like(lines)
    _call("gaussian", "filter_lines", lines, half, out)
    return out.reshape(shape)


def mask_offsets(cost: Tensor, moving: Tensor, kernel_size: int) -> Tensor:
    """:meth:`voxelopt.masking.Support.mask_offsets` in one pass, bit for bit, in place.

    Args:
        cost: ``(B, K, D, H, W)`` contiguous float32 cost (overwritten).
        moving: ``(B, 1, D, H, W)`` moving mask (an offset is inside where it reads > 0.5,
            replicated beyond the array).
        kernel_size: the search half-width ``k``.

    Returns:
        ``cost``.
    """
    from voxelopt.cost import search_offsets

    k = kernel_size
    padded = torch.nn.functional.pad(moving.float(), (k,) * 6, mode="replicate")
    offsets = search_offsets(k).long().numpy()
    _call("masks", "mask_offsets", cost.numpy(), _array(padded), offsets, k)
    return cost


def mind_ssc(image: Tensor, radius: int, dilation: int) -> Tensor:
    """:func:`voxelopt.features.mind.mind_ssc`: ``(B, 1, D, H, W)`` -> ``(B, 12, D, H, W)``.

    Equal to torch's to float32 rounding (another order of the box sums, another ``exp``).
    """
    from voxelopt.features.mind import MIND_PAIRS

    pairs = np.array(MIND_PAIRS, dtype=np.int64)
    padded = torch.nn.functional.pad(image, (dilation,) * 6, mode="replicate")
    b, _, d, h, w = image.shape
    out = image.new_empty((b, pairs.shape[0], d, h, w))
    var = torch.empty((d, h, w))
    sums = np.empty(d, dtype=np.float64)
    inv_box, inv_pairs = _f32(1.0 / (2 * radius + 1) ** 3), _f32(1.0 / pairs.shape[0])
    for i in range(b):
        target = out[i].numpy()
        source = _array(padded[i, 0])
        args = (source, pairs, dilation, radius, inv_box, inv_pairs, target, var.numpy(), sums)
        _call("mind", "distances", *args)
        _call("mind", "normalise", target, var.numpy(), _f32(sums.sum() / var.numel()))
    return out


def _border(padding_mode: str) -> bool:
    if padding_mode not in ("zeros", "border"):
        raise ValueError(f"padding_mode must be 'zeros' or 'border' here, got {padding_mode!r}")
    return padding_mode == "border"


def _scales(disp: Tensor) -> np.ndarray:
    """Per spatial axis, ``grid_sample``'s voxel-to-normalised scale ``2 / max(n - 1, 1)``."""
    return np.array([2.0 / max(n - 1, 1) for n in disp.shape[2:]], dtype=np.float32)


def _f32(value: float) -> np.float32:
    return np.float32(value)
