"""Numba smoothing (all passes and iterations in one sweep) against the torch operator."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.filtering import adaptive_smooth, side_weight, smooth  # noqa: E402


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """The kernel cuts few channels into slabs by thread count: test both layouts."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _data(batch, channels, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, *shape, generator=g) * 4 - 1
    weight = side_weight(0.1 + 0.5 * torch.rand(batch, 1, *shape, generator=g))
    return x, weight


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 3, 2), (2, 1, 4), (3, 4, 1), (13, 5, 6)])
@pytest.mark.parametrize("channels", [1, 3, 27])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
def test_equals_torch(shape, channels, batch, iterations, threads):
    x, weight = _data(batch, channels, shape, seed=iterations)
    out = kernels.smooth(x, weight, iterations)
    assert torch.equal(out, smooth(x, weight, iterations))
    assert not torch.equal(out, x) or iterations == 0


@pytest.mark.parametrize("channels", [3, 27])
def test_inplace_and_fixed_weight(channels, threads):
    x, _ = _data(1, channels, (7, 6, 5))
    expected = smooth(x, side_weight(0.5), 3)
    y = x.clone()
    out = smooth(y, side_weight(0.5), 3, inplace=True, backend="numba")
    assert torch.equal(out, expected)
    if out.data_ptr() != y.data_ptr():  # few channels: a new tensor, the input untouched
        assert torch.equal(y, x)


def test_adaptive_smooth_and_zero_iterations():
    x, _ = _data(2, 3, (6, 5, 4))
    sigma = 0.1 + torch.rand(2, 1, 6, 5, 4)
    assert torch.equal(adaptive_smooth(x, sigma, 3, backend="numba"), adaptive_smooth(x, sigma, 3))
    assert smooth(x, 0.3, 0, backend="numba") is x


def test_constant_interior_preserved():
    x = torch.full((1, 2, 12, 12, 12), 2.0)
    out = kernels.smooth(x, side_weight(torch.rand(1, 1, 12, 12, 12)), 3)
    torch.testing.assert_close(out[..., 3:-3, 3:-3, 3:-3], x[..., 3:-3, 3:-3, 3:-3])


def test_weights_outside_the_kernel_range():
    x, _ = _data(1, 2, (4, 5, 6))
    for weight in (0.6, -0.1, torch.full((1, 1, 4, 5, 6), 0.7)):
        assert kernels.smooth(x, weight, 2) is None
        # auto falls back to torch, numba refuses
        assert torch.equal(smooth(x, weight, 2, backend="auto"), smooth(x, weight, 2))
        with pytest.raises(ValueError, match="side weights"):
            smooth(x, weight, 2, backend="numba")
    for bad in (0.5, float("nan"), -0.0001):  # one voxel's weight is enough
        weight = torch.full((1, 1, 4, 5, 6), 0.2)
        weight[0, 0, 3, 4, 5] = bad
        assert kernels.smooth(x, weight, 2) is None
    assert kernels.smooth(x, torch.full((1, 1, 4, 5, 6), 0.0), 2) is not None
