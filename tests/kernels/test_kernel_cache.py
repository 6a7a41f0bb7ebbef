"""The kernels' disk cache is dropped when any kernel source changed (numba checks only a
kernel's own file, but kernels inline helpers from the others)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402


def _stamps(module):
    found = {}
    for name, obj in vars(module).items():
        cache = getattr(obj, "_cache", None)
        if cache is None or obj.py_func.__module__ != module.__name__:
            continue
        found[name] = (Path(cache._cache_path) / f"_cost.{name}.sources", cache)
    return found


def test_stale_stamp_flushes_and_current_stamp_keeps(monkeypatch):
    from numba.core.caching import FunctionCache

    runtime = importlib.import_module("voxelopt.kernels._runtime")
    kernels.cost_volume(torch.rand(1, 1, 3, 3, 3), torch.rand(1, 1, 3, 3, 3), 1)  # stamps written
    cost = importlib.import_module("voxelopt.kernels._cost")
    stamps = _stamps(cost)
    assert set(stamps) == {"cost_volume"}
    stamp, _ = stamps["cost_volume"]
    if not stamp.is_file():
        pytest.skip(f"numba's cache folder {stamp.parent} is not writable here")
    assert stamp.read_text() == runtime.sources_digest()

    flushed = []
    monkeypatch.setattr(FunctionCache, "flush", lambda self: flushed.append(self))
    runtime.drop_stale_cache(cost)
    assert flushed == []  # current: the cache is kept

    stamp.write_text("an older version of the kernels")
    runtime.drop_stale_cache(cost)
    assert len(flushed) == 1 and stamp.read_text() == runtime.sources_digest()


def test_compile_notice_once_per_process(monkeypatch):
    """The command line shows a line before the kernels compile (first use on a machine)."""
    runtime = importlib.import_module("voxelopt.kernels._runtime")
    monkeypatch.setattr(kernels, "_CHECKED", set())
    monkeypatch.setattr(kernels, "_NOTIFIED", [])
    heard = []
    monkeypatch.setattr(kernels, "compile_notice", heard.append)
    monkeypatch.setattr(runtime, "drop_stale_cache", lambda module: True)  # as if stale
    x = torch.rand(1, 3, 4, 5, 6)
    kernels.smooth(x, 0.2, 1)
    kernels.warp(x, torch.zeros(1, 3, 4, 5, 6))
    assert heard == [kernels.COMPILE_MESSAGE]
    monkeypatch.setattr(kernels, "_CHECKED", set())
    monkeypatch.setattr(kernels, "_NOTIFIED", [])
    monkeypatch.setattr(runtime, "drop_stale_cache", lambda module: False)  # cached
    kernels.smooth(x, 0.2, 1)
    assert heard == [kernels.COMPILE_MESSAGE]
