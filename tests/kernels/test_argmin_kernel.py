"""Numba hard (coupled) argmin against the torch operator: the same choice, ties included."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.cost import search_offsets  # noqa: E402
from voxelopt.solver import hard_argmin, offset_argmin  # noqa: E402


def _inputs(batch, k, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, (2 * k + 1) ** 3, *shape, generator=g)
    u = (torch.rand(batch, 3, *shape, generator=g) - 0.5) * 2 * k
    return cost, u, search_offsets(k)


@pytest.mark.parametrize("shape", [(5, 6, 7), (3, 3, 3), (1, 4, 2)])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("gamma", [0.0, 0.003, 0.3, 1.0])
def test_equals_torch(shape, batch, k, gamma):
    cost, u, offsets = _inputs(batch, k, shape, seed=k + 7 * batch)
    out = kernels.hard_argmin(cost, offsets, u, gamma)
    assert out.shape == (batch, 3, *shape) and out.dtype == torch.float32
    assert torch.equal(out, hard_argmin(cost, offsets, u, gamma))
    assert torch.equal(hard_argmin(cost, offsets, u, gamma, backend="numba"), out)


def test_exact_ties_keep_zero_offset():
    cost = torch.full((2, 27, 3, 4, 5), 0.25)
    assert kernels.hard_argmin(cost, search_offsets(1)).abs().max() == 0
    u = torch.zeros(2, 3, 3, 4, 5)
    assert kernels.hard_argmin(cost, search_offsets(1), u, 0.5).abs().max() == 0


def test_near_ties_resolve_like_torch():
    """Costs that differ only in the 5 packed mantissa bits go to the first offset, as in
    torch's packed argmin; a difference above them is a real minimum."""
    offsets = search_offsets(1)
    bits = torch.full((1, 27, 2, 2, 2), 0x3F800010, dtype=torch.int32)  # 1 + 16 ulps
    bits[0, 13, 0] -= 7  # 7 ulps lower, same 32-ulp bucket -> still the zero offset
    bits[0, 13, 1] -= 64  # 64 ulps lower: offset 13 wins
    cost = bits.view(torch.float32)
    out = kernels.hard_argmin(cost, offsets)
    assert torch.equal(out, hard_argmin(cost, offsets))
    assert out[0, :, 0].abs().max() == 0
    assert torch.equal(out[0, :, 1], offsets[13].view(3, 1, 1).expand(3, 2, 2))


def test_negative_cost_plain_argmin_is_exact_first_minimum():
    offsets = search_offsets(1)
    cost = torch.rand(1, 27, 3, 3, 3) - 0.5
    assert torch.equal(offset_argmin(cost, offsets, backend="numba"), offset_argmin(cost, offsets))


def test_smoothed_cost_volume_like_the_solver():
    """The solver's own inputs: a pre-filtered cost volume with long runs of equal values."""
    from voxelopt.cost import cost_volume
    from voxelopt.filtering import side_weight, smooth

    f = torch.rand(1, 2, 8, 9, 10)
    f[..., :3] = 0.5  # flat region: exact ties
    cost = cost_volume(f, torch.roll(f, 1, dims=3))
    cost = smooth(cost, side_weight(0.4), 3)
    offsets = search_offsets(1)
    v = hard_argmin(cost, offsets)
    assert torch.equal(kernels.hard_argmin(cost, offsets), v)
    u = smooth(v, side_weight(0.4), 3)
    for gamma in (0.003, 0.1, 1.0):
        assert torch.equal(
            kernels.hard_argmin(cost, offsets, u, gamma), hard_argmin(cost, offsets, u, gamma)
        )
