"""Numba entropy, sigma map and side weight against the torch operators (float rounding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.entropy import displacement_entropy, sigma_map  # noqa: E402
from voxelopt.filtering import side_weight  # noqa: E402


def _reference_entropy(cost, beta, floor):
    """The definition in float64: softmax(-C / beta), clamp, renormalise, -sum p log p."""
    p = torch.softmax(cost.double() * (-1.0 / beta), dim=1).clamp(floor, 1.0)
    p = p / p.sum(1, keepdim=True)
    return -(p * p.log()).sum(1, keepdim=True)


@pytest.mark.parametrize("shape", [(5, 6, 7), (3, 3, 3), (1, 1, 700)])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("beta, scale", [(0.1, 1.0), (0.1, 0.01), (0.05, 3.0)])
def test_entropy_equals_torch_to_rounding(shape, batch, k, beta, scale):
    g = torch.Generator().manual_seed(batch + 10 * k)
    cost = torch.rand(batch, (2 * k + 1) ** 3, *shape, generator=g) * scale
    out = kernels.displacement_entropy(cost, beta, 1e-6)
    reference = _reference_entropy(cost, beta, 1e-6)
    torch_f32 = displacement_entropy(cost, beta, 1e-6)
    assert out.shape == (batch, 1, *shape) and out.dtype == torch.float32
    # a few float32 ulps of values up to log K, as torch's own float32 path
    torch.testing.assert_close(out, torch_f32, atol=1e-5, rtol=0)
    assert (out.double() - reference).abs().max() <= 1e-5
    assert (torch_f32.double() - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", [(5, 6, 7), (3, 40, 50)])  # planes of one and of many blocks
@pytest.mark.parametrize("batch", [1, 2])
def test_cost_and_entropy_in_one_pass(shape, batch):
    f, m = torch.rand(batch, 3, *shape), torch.rand(batch, 3, *shape)
    cost, entropy = kernels.cost_and_entropy(f, m, 1, 0.1, 1e-6)
    assert torch.equal(cost, kernels.cost_volume(f, m, 1))
    assert torch.equal(entropy, kernels.displacement_entropy(cost, 0.1, 1e-6))


def test_entropy_extremes():
    cost = torch.ones(1, 27, 2, 3, 4)  # all offsets alike: log 27
    out = kernels.displacement_entropy(cost, 0.1, 1e-6)
    torch.testing.assert_close(out, torch.full_like(out, math.log(27)), atol=2e-6, rtol=0)
    cost[:, 5] = 0.0
    cost[:, :5] = 10.0  # one clear minimum: every other probability at the floor
    out = kernels.displacement_entropy(cost, 0.1, 1e-6)
    torch.testing.assert_close(out, displacement_entropy(cost, 0.1, 1e-6), atol=1e-6, rtol=0)
    assert torch.equal(displacement_entropy(cost, 0.1, 1e-6, backend="numba"), out)


@pytest.mark.parametrize("mode", ["reference", "paper"])
@pytest.mark.parametrize("batch", [1, 2])
def test_sigma_and_weight_equal_torch(mode, batch):
    g = torch.Generator().manual_seed(3)
    entropy = torch.rand(batch, 1, 7, 5, 600, generator=g) * 3.0
    sigma, weight = kernels.sigma_and_weight(entropy, mode, 0.1, 0.5, 1.5)
    expected = sigma_map(entropy, mode, 0.1, 0.5, 1.5)
    torch.testing.assert_close(sigma, expected, atol=2e-7, rtol=0)
    torch.testing.assert_close(weight, side_weight(expected), atol=2e-7, rtol=0)
    assert torch.equal(sigma_map(entropy, mode, 0.1, 0.5, 1.5, backend="numba"), sigma)


def test_sigma_of_constant_entropy():
    entropy = torch.full((2, 1, 3, 4, 5), 0.7)
    sigma, weight = kernels.sigma_and_weight(entropy, "reference", 0.1, 0.5, 1.5)
    assert torch.equal(sigma, sigma_map(entropy))  # max - min clamped: sigma_low everywhere
    torch.testing.assert_close(weight, side_weight(sigma), atol=1e-9, rtol=0)


def test_fast_exp_within_one_ulp():
    from voxelopt.kernels._runtime import fast_exp, jit

    @jit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_exp(x[i])

    x = np.linspace(-87.3, 87.0, 400_001, dtype=np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(out - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0
    tiny = np.array([-87.4, -200.0, -np.inf], dtype=np.float32)
    apply(tiny, out[:3])
    assert (out[:3] == 0).all()


def test_fast_log_within_one_ulp():
    from voxelopt.kernels._runtime import fast_log, jit

    @jit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_log(x[i])

    x = np.concatenate(
        [
            np.geomspace(1.2e-38, 3e38, 200_001).astype(np.float32),
            np.float32(1) + np.arange(-5000, 5000, dtype=np.float32) * np.float32(2**-23),
        ]
    )
    out = np.empty_like(x)
    apply(x, out)
    exact = np.log(x.astype(np.float64))
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert (np.abs(out - exact) / np.maximum(spacing, 1e-45)).max() <= 1.0
