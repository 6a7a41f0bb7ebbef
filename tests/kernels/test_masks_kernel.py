"""Numba offsets-outside-the-data against the torch operator: the same values bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.masking import level_support  # noqa: E402

SHAPES = [(4, 5, 6), (3, 3, 3), (1, 4, 7), (6, 1, 2), (9, 8, 1)]


def _case(shape, batch, k, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, (2 * k + 1) ** 3, *shape, generator=g)
    moving = (torch.rand(batch, 1, *shape, generator=g) > 0.3).float()
    moving[0, 0, ..., -1] = 0  # a face without data
    moving[0, 0, 0, 0, 0] = 0.5  # counts as data
    if batch > 1:
        moving[1] = 0  # no offset valid anywhere: the cost stays as it is
    return cost, moving


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 2])
def test_equals_torch(shape, batch, k):
    cost, moving = _case(shape, batch, k, seed=hash((shape, batch, k)) % 2**31)
    support = level_support(None, moving)
    expected = support.mask_offsets(cost.clone(), k, backend="torch")
    out = kernels.mask_offsets(cost.clone(), support.moving, k)
    assert torch.equal(out, expected)
    assert not torch.equal(expected, cost) or batch == 2 or moving.min() > 0.5  # a change


def test_dispatch_in_place_and_graph_path():
    cost, moving = _case((5, 6, 7), 2, 1, seed=3)
    support = level_support(None, moving)
    expected = support.mask_offsets(cost.clone(), 1, backend="torch")
    target = cost.clone()
    assert support.mask_offsets(target, 1, backend="numba") is target
    assert torch.equal(target, expected)
    assert torch.equal(support.mask_offsets(cost.clone(), 1, backend="auto"), expected)
    leaf = cost.clone().requires_grad_()  # a graph: the torch path, same values
    out = support.mask_offsets(leaf, 1, backend="auto")
    assert out.requires_grad and torch.equal(out.detach(), expected)
    with pytest.raises(ValueError, match="float32"):
        support.mask_offsets(cost.double(), 1, backend="numba")
