"""What every numba kernel module shares: the decorator, the thread count, a vectorisable exp.

This module imports numba; only the kernel modules import it, and those only when the numba
backend is first used (see :mod:`voxelopt.kernels`).

Threading layer: TBB (the ``tbb`` package, a dependency on Linux and Windows x86-64), else numba's
``workqueue``, unless ``NUMBA_THREADING_LAYER`` names one. numba's default OpenMP layer puts
a second worker pool beside torch's own OpenMP pool (another copy of libgomp): a worker woken
for each of a solve's ~140 parallel kernels waited for a scheduler tick whenever the two cores
had other work (4-8 ms per kernel measured), and an idle worker kept spinning at 100 % of a
core. ``workqueue`` has neither problem but costs ~125 us to start each parallel loop (a
futex wake and join; 2-5 us for OpenMP and TBB), 17 ms of a 96 x 80 x 128 solve. TBB's
workers spin briefly and then sleep (no CPU used when idle). Whole solves (96 x 80 x 128 x 8,
2 threads, one run, 7 solves each): quiet machine ``workqueue`` 0.38 s, ``tbb`` 0.32-0.34 s,
``omp`` 0.31-0.33 s; a third process busy on one core: 0.68 s, 0.60-0.62 s, 0.70-0.74 s.
``workqueue`` must not be entered from two threads at once; :mod:`voxelopt.kernels` runs one
kernel at a time under a lock.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from types import ModuleType

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = [
    "THREADING_LAYERS",
    "drop_stale_cache",
    "sources_digest",
    "fast_exp",
    "fast_log",
    "float32_bits",
    "fma",
    "jit",
    "parallel_jit",
    "set_threads",
]

#: The first threading layer that loads, in this order (see above; numba wants all three
#: named, and workqueue, built into numba, always loads).
THREADING_LAYERS = ["tbb", "workqueue", "omp"]
if "NUMBA_THREADING_LAYER" not in os.environ:  # takes effect if no parallel code ran yet
    numba.config.THREADING_LAYER_PRIORITY = THREADING_LAYERS
    numba.config.THREADING_LAYER = "default"

#: Compiled once per machine and kept in numba's cache (``__pycache__`` beside the sources or,
#: where that is read-only, numba's per-user cache folder); later processes load it in
#: milliseconds. ``fastmath`` stays off: the kernels must round like the torch operators.
#: ``error_model="numpy"``: a float division is IEEE's (inf or nan for a zero divisor, as
#: torch's) instead of a test and a Python exception, which kept LLVM from vectorising every
#: loop with a division (the entropy: 51 -> 40 ns a voxel, the same values).
_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}
jit = numba.njit(**_OPTIONS)


def parallel_jit(func):
    """:data:`jit` with ``parallel=True``: ``numba.prange`` loops run on all threads."""
    return numba.njit(parallel=True, **_OPTIONS)(func)


@functools.lru_cache(maxsize=1)
def sources_digest() -> str:
    """A digest of every kernel source of this folder (read once per process)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("_*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def drop_stale_cache(module: ModuleType) -> bool:
    """Forget ``module``'s cached kernels when any kernel source changed since they were saved.

    numba checks a cached kernel against its own file only, but kernels inline helpers from
    other files of this folder (the entropy in the cost volume, :func:`fast_exp` in several):
    after an edit of a helper, or a ``git pull`` in an editable install, the cache would still
    hold the old machine code. A stamp beside each module's cache names the sources it was
    built from. Call before the module's first kernel call.

    Returns:
        Whether a kernel's stamp was missing or stale, so that numba will compile it (the
        first use on a machine, or after an edit).
    """
    digest = sources_digest()
    compiles = False
    for obj in vars(module).values():
        if not isinstance(obj, numba.core.dispatcher.Dispatcher):
            continue
        if obj.py_func.__module__ != module.__name__:  # imported from another module
            continue
        cache = getattr(obj, "_cache", None)
        folder = getattr(cache, "_cache_path", None)
        if folder is None:
            continue
        stamp = Path(folder) / f"{module.__name__.rsplit('.', 1)[-1]}.{obj.__name__}.sources"
        try:
            if stamp.is_file() and stamp.read_text() == digest:
                continue
            compiles = True
            cache.flush()
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(digest)
        except OSError:  # a read-only cache: numba recompiles what it cannot load
            continue
    return compiles


def set_threads() -> None:
    """Let numba use as many threads as torch (``torch.set_num_threads`` governs both)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@intrinsic
def _bits_to_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (no conversion; vectorisable)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def float32_bits(typingctx, value):
    """The bits of a float32 as an int32 (no conversion; vectorisable)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's ``llvm.fma``; one instruction where the CPU has FMA).

    torch's vectorised CPU ``lerp`` is a fused multiply-add; the smoothing uses this to round
    exactly as it does.
    """
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LOW = np.float32(-87.33654)  # below: the float32 result is subnormal; returned as 0
_EXP_HIGH = np.float32(88.0)  # keeps 2^k finite
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_P0 = np.float32(1.9875691500e-4)  # Cephes expf polynomial on [-ln2/2, ln2/2]
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)


@jit
def fast_exp(x):
    """``exp`` of a float32 within 1 ulp (measured) that LLVM can vectorise (for ``x <= 88``).

    numba's ``np.exp`` calls libm once per element, about 10x slower than torch's vectorised
    exp. This is the Cephes ``expf``: ``x = k ln 2 + r``, a degree-6 polynomial in ``r``,
    and ``2^k`` built from its bits. Arguments below -87.34 (subnormal results) give 0.
    """
    low = x < _EXP_LOW
    x = min(max(x, _EXP_LOW), _EXP_HIGH)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI
    r = r - k * _LN2_LO
    p = _P0 * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * (r * r) + r + _ONE
    scale = _bits_to_float32(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))
    return np.float32(0.0) if low else p * scale


_SQRT_HALF = np.float32(0.707106781186547524)
_L0 = np.float32(7.0376836292e-2)  # Cephes logf polynomial on [sqrt(1/2) - 1, sqrt(2) - 1]
_L1 = np.float32(-1.1514610310e-1)
_L2 = np.float32(1.1676998740e-1)
_L3 = np.float32(-1.2420140846e-1)
_L4 = np.float32(1.4249322787e-1)
_L5 = np.float32(-1.6668057665e-1)
_L6 = np.float32(2.0000714765e-1)
_L7 = np.float32(-2.4999993993e-1)
_L8 = np.float32(3.3333331174e-1)


@jit
def fast_log(x):
    """Natural log of a positive normal float32 within 1 ulp (measured), vectorisable.

    The Cephes ``logf``: ``x = m 2^e`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` taken from the
    bits, then a degree-9 polynomial in ``m - 1``. Not for 0, subnormals, infinities or NaN.
    """
    bits = float32_bits(x)
    e = np.float32(((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126))
    m = _bits_to_float32(np.int32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000)))
    if m < _SQRT_HALF:  # m in [0.5, 1): fold into [sqrt(1/2), sqrt(2))
        e -= _ONE
        m = m + m - _ONE
    else:
        m = m - _ONE
    z = m * m
    y = _L0 * m + _L1
    y = y * m + _L2
    y = y * m + _L3
    y = y * m + _L4
    y = y * m + _L5
    y = y * m + _L6
    y = y * m + _L7
    y = y * m + _L8
    y = y * m * z
    y += _LN2_LO * e
    y += -_HALF * z
    return (m + y) + _LN2_HI * e
