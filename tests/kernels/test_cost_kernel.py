"""Numba cost volume against the torch operator: the same values bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.cost import cost_volume  # noqa: E402

SHAPES = [(5, 6, 7), (3, 3, 3), (2, 7, 4), (1, 3, 2), (9, 1, 11)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("channels", [1, 3, 12])
def test_equals_torch(shape, batch, k, channels):
    g = torch.Generator().manual_seed(hash((shape, batch, k, channels)) % 2**31)
    f = torch.rand(batch, channels, *shape, generator=g)
    m = torch.rand(batch, channels, *shape, generator=g)
    out = kernels.cost_volume(f, m, k)
    assert out.shape == (batch, (2 * k + 1) ** 3, *shape) and out.dtype == torch.float32
    assert torch.equal(out, cost_volume(f, m, k))


def test_dispatch_and_strided_inputs():
    f = torch.rand(2, 3, 6, 5, 4)
    m = torch.rand(2, 3, 6, 5, 4).transpose(0, 1).contiguous().transpose(0, 1)  # strided
    expected = cost_volume(f, m)
    assert torch.equal(cost_volume(f, m, backend="numba"), expected)
    assert torch.equal(cost_volume(f, m, backend="auto"), expected)


def test_plain_loop_reference():
    """Independent of torch's path: C(x, o) = mean_c |F(x) - M(x + o)|, zero padding."""
    f = torch.rand(1, 2, 3, 4, 5)
    m = torch.rand(1, 2, 3, 4, 5)
    out = kernels.cost_volume(f, m, 1)
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1, 1, 1))
    from voxelopt.cost import search_offsets

    for n, (i, j, l) in enumerate(search_offsets(1).long().tolist()):
        shifted = padded[:, :, 1 + i : 4 + i, 1 + j : 5 + j, 1 + l : 6 + l]
        torch.testing.assert_close(out[:, n], (f - shifted).abs().mean(1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.rand(1, 2, 4, 4, 4, dtype=torch.float64), "float32"),
        (lambda: torch.rand(1, 2, 4, 4, 4).requires_grad_(), "gradients"),
    ],
)
def test_numba_backend_refuses(make, match):
    f = make()
    with pytest.raises(ValueError, match=match):
        cost_volume(f, f.detach().clone(), backend="numba")
