"""Shared pytest fixtures: dtype/device parametrisation and the real-CT data."""

from __future__ import annotations

import pytest
import torch

from voxelopt.paths import abdomen_ct_dir, obelisk_weights, shared_dir

torch.set_num_threads(2)

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, ids=lambda d: d.type)
def device(request) -> torch.device:
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request) -> torch.dtype:
    return request.param


def _require(path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the shared folder {shared_dir()} is absent)")
    return path


@pytest.fixture(scope="session")
def ct_dir():
    """Folder of the real abdominal CT; skips when ../shared is absent."""
    return _require(abdomen_ct_dir(), "real abdominal CT")


@pytest.fixture(scope="session")
def obelisk_path():
    """Pretrained OBELISK weights; skips when ../shared is absent."""
    return _require(obelisk_weights(), "OBELISK weights")
