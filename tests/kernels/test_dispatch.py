"""Which backend runs where: the ``backend`` setting of the operators and of the config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from voxelopt import VoxelOpt, VoxelOptConfig, kernels
from voxelopt.solver import level_backend

needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize(
    "tensor, auto",
    [
        (torch.rand(2, 2), True),
        (torch.rand(2, 2, dtype=torch.float64), False),
        (torch.rand(2, 2, dtype=torch.bfloat16), False),
        (torch.rand(2, 2).requires_grad_(), False),
    ],
)
def test_use_numba(tensor, auto):
    assert kernels.use_numba("auto", tensor) is auto
    assert kernels.use_numba("torch", tensor) is False
    if auto:
        assert kernels.use_numba("numba", tensor) is True
    else:
        with pytest.raises(ValueError, match="backend='numba'"):
            kernels.use_numba("numba", tensor)


@needs_numba
def test_no_grad_mode_allows_numba_for_leaf_tensors():
    t = torch.rand(2, 2).requires_grad_()
    with torch.no_grad():
        assert kernels.use_numba("auto", t, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_tensors_stay_on_torch():
    t = torch.rand(2, 2, device="cuda")
    assert not kernels.use_numba("auto", t)
    with pytest.raises(ValueError, match="CPU"):
        kernels.use_numba("numba", t)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.use_numba("cuda", torch.rand(1))


def test_without_numba_auto_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    assert not kernels.use_numba("auto", torch.rand(1))
    with pytest.raises(ValueError, match="pip install numba"):
        kernels.use_numba("numba", torch.rand(1))


class TestConfig:
    def test_default_is_auto(self):
        assert VoxelOptConfig().backend == "auto"
        assert VoxelOptConfig(backend="torch").to_dict()["backend"] == "torch"

    def test_invalid(self):
        with pytest.raises(ValueError, match="backend"):
            VoxelOptConfig(backend="cuda")
        with pytest.raises(ValueError, match="backend 'numba' needs argmin='hard'"):
            VoxelOptConfig(backend="numba", argmin="soft")

    @needs_numba
    def test_level_backend(self):
        f = torch.rand(1, 2, 4, 4, 4)
        assert level_backend(VoxelOptConfig(), f, f) == "numba"
        assert level_backend(VoxelOptConfig(backend="torch"), f, f) == "torch"
        assert level_backend(VoxelOptConfig(argmin="soft"), f, f) == "torch"
        assert level_backend(VoxelOptConfig(), f.double(), f.double()) == "torch"
        g = f.clone().requires_grad_()
        assert level_backend(VoxelOptConfig(), g, g) == "torch"


@needs_numba
def test_soft_and_autograd_paths_never_touch_the_kernels(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a numba kernel ran")

    for name in ("cost_volume", "smooth", "hard_argmin", "warp", "compose", "integrate_velocity"):
        monkeypatch.setattr(kernels, name, forbidden)
    f = torch.rand(1, 2, 12, 12, 12)
    VoxelOpt(levels=2, argmin="soft")(f, torch.rand_like(f))
    g = f.clone().requires_grad_()
    VoxelOpt(levels=2)(g, torch.rand_like(f)).sum().backward()
    assert g.grad is not None
    VoxelOpt(levels=2, backend="torch")(f, torch.rand_like(f))


def test_import_voxelopt_does_not_import_numba():
    code = "import sys, voxelopt, voxelopt.kernels; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_numba
def test_kernels_from_two_python_threads():
    """numba's workqueue layer aborts the process on concurrent entry; the kernels take a
    lock. Run in a subprocess so that a failure cannot take the test session with it."""
    code = """
import threading, torch
from voxelopt import VoxelOpt
f = torch.rand(1, 2, 20, 20, 20); m = torch.roll(f, 1, dims=2)
expected = VoxelOpt(levels=2, backend="numba")(f, m)
results = []
def work():
    for _ in range(3):
        results.append(torch.equal(VoxelOpt(levels=2, backend="numba")(f, m), expected))
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]; [t.join() for t in threads]
print(all(results) and len(results) == 9)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


@needs_numba
@pytest.mark.parametrize("override", [None, "workqueue"])
def test_threading_layer(override):
    """TBB where the tbb package loads, else workqueue; never numba's OpenMP layer by
    default (a second OpenMP pool beside torch's); NUMBA_THREADING_LAYER overrides."""
    import importlib.metadata

    code = """
import torch, numba
from voxelopt import kernels
kernels.smooth(torch.rand(1, 3, 8, 8, 8), 0.2, 1)
print(numba.threading_layer())
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if override:
        env["NUMBA_THREADING_LAYER"] = override
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        importlib.metadata.version("tbb")
        has_tbb = True
    except importlib.metadata.PackageNotFoundError:
        has_tbb = False
    expected = override or ("tbb" if has_tbb else "workqueue")
    assert out.stdout.strip() == expected


@needs_numba
def test_warm_up():
    assert kernels.warm_up() is None
    thread = kernels.warm_up(background=True)
    thread.join(timeout=120)
    assert not thread.is_alive()
