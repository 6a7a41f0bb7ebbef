"""Process-wide memory allocator policy for large CPU registrations.

Every large CPU tensor (a 27-offset cost volume at 192x160x256 is 850 MB) is served by glibc's
``malloc`` through a fresh ``mmap`` and handed back to the operating system when freed, so the
next one page-faults all of its pages in again. Under a hypervisor that costs more than the
arithmetic: at 192x160x256 half of a solve's wall time went to the kernel (8.6 s of system
time in a 17 s solve on 2 cores; see BENCHMARKS.md). :func:`keep_freed_memory` asks ``malloc``
to serve such blocks from its heap and to keep freed memory for reuse.

The setting is process-global, so the library never applies it on import: the command-line
tool and the entry points (``voxelopt``, ``train.py``, ``eval.py``, ``compare.py``) do through
:func:`configure_from_environment` unless ``VOXELOPT_KEEP_FREED_MEMORY=0``, and a notebook can
call :func:`keep_freed_memory` once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["ENV_VAR", "configure_from_environment", "keep_freed_memory"]

#: Set to ``0`` to leave the allocator alone in the entry points.
ENV_VAR = "VOXELOPT_KEEP_FREED_MEMORY"

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest value ``mallopt`` takes (an ``int``): blocks below 2 GB come from the heap.
_LIMIT = 2**31 - 1


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse instead of returning it to the OS.

    Raises glibc's ``mmap`` and trim thresholds to 2 GB, so that the solver's large temporary
    tensors are recycled instead of being page-faulted in anew each time. Resident memory
    then stays near the peak after a registration, and the peak itself grows a little (the
    heap fragments: +14-23 % at 192x160x256, unchanged at 96x80x128; see BENCHMARKS.md). Call it
    once, early; it affects the whole process.

    Returns:
        ``True`` when the policy was applied (Linux with glibc), ``False`` where it is not
        available (other C libraries and platforms), in which case nothing changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1
    return mmap_ok and trim_ok


def configure_from_environment() -> bool:
    """The entry points' policy: :func:`keep_freed_memory` unless ``VOXELOPT_KEEP_FREED_MEMORY``
    is ``0``.

    Returns:
        Whether the policy is now in effect.
    """
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    return keep_freed_memory()
