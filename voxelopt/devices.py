"""Which code path a tensor's device takes, and a switch that lets tests take the GPU path on CPU.

Three torch operators cut their work into pieces on CPU only: :func:`voxelopt.filtering.smooth`
takes a few channels at a time, :func:`voxelopt.entropy.displacement_entropy` (graph-free) a
block of voxels at a time, and :func:`voxelopt.transform.grid_sample_3d` cuts the sampling grid
of a single sample into one piece per thread. On a GPU each piece would cost kernel launches
and gain nothing, so there each operator takes the whole tensor in one go. Both paths do the
same arithmetic per element. All three ask :func:`cpu_tiling`, and :func:`force_device_paths`
makes that answer what it would be on another device, so that the GPU path runs (and is
tested) on a machine without a GPU::

    with force_device_paths("cuda"):  # CPU tensors, GPU code path
        out = smooth(x, weight)
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["cpu_tiling", "force_device_paths", "forced_device_type"]

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "voxelopt_forced_device_type", default=None
)


def cpu_tiling(t: Tensor) -> bool:
    """Whether operators on ``t`` split their work into CPU-sized pieces.

    ``True`` for a CPU tensor: channel groups of the smoothing and voxel blocks of the entropy
    stay in the last-level cache, and a one-sample ``grid_sample`` is cut into one piece per
    thread (ATen's 3-D CPU kernel parallelises over the batch only). ``False`` on any other
    device (CUDA, MPS, ...): one call over the whole tensor, since each piece would be a kernel
    launch and a GPU has no such cache or thread limits. Inside :func:`force_device_paths` the
    forced device type decides instead of ``t.device``.

    Args:
        t: a tensor the operator works on.

    Returns:
        ``True`` for the CPU path, ``False`` for the GPU path.
    """
    forced = _FORCED.get()
    return (forced or t.device.type) == "cpu"


def forced_device_type() -> str | None:
    """The device type set by an enclosing :func:`force_device_paths`, or ``None``."""
    return _FORCED.get()


@contextmanager
def force_device_paths(device: str | torch.device | None) -> Iterator[None]:
    """Take the code paths of ``device`` whatever device the tensors are on (for tests).

    Only :func:`cpu_tiling` follows it; tensors stay where they are and the numba kernels'
    own check (:func:`voxelopt.kernels.use_numba`) still looks at the real device. The setting
    is per thread (a context variable) and restored on exit; contexts nest.

    Args:
        device: ``"cpu"``, ``"cuda"`` (any non-CPU device type gives the GPU path), a
            ``torch.device``, or ``None`` for the tensors' own device.

    Raises:
        TypeError: ``device`` is not a str, ``torch.device`` or ``None``.
        ValueError: ``device`` names no device type torch knows.
    """
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
    try:
        device_type = None if device is None else torch.device(device).type
    except RuntimeError as err:
        raise ValueError(
            f"device must name a torch device type such as 'cuda', got {device!r}"
        ) from err
    token = _FORCED.set(device_type)
    try:
        yield
    finally:
        _FORCED.reset(token)
