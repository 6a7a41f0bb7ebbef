"""Numba MIND-SSC against the torch operator (float32 rounding) and its float64 values."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.features.mind import mind_ssc  # noqa: E402

SHAPES = [(5, 6, 7), (3, 3, 3), (2, 7, 4), (1, 3, 2), (9, 1, 11), (12, 10, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("radius, dilation", [(1, 2), (0, 1), (1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_torch(shape, radius, dilation, batch):
    g = torch.Generator().manual_seed(hash((shape, radius, dilation, batch)) % 2**31)
    image = torch.rand(batch, 1, *shape, generator=g)
    out = kernels.mind_ssc(image, radius, dilation)
    assert out.shape == (batch, 12, *shape) and out.dtype == torch.float32
    exact = mind_ssc(image.double(), radius, dilation, backend="torch")
    # float32 rounding of sums of up to 125 squares and of exp: both paths stay this close
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-5)
    torch.testing.assert_close(
        out, mind_ssc(image, radius, dilation, backend="torch"), rtol=0, atol=2e-5
    )


def test_constant_image_and_range():
    torch.testing.assert_close(
        kernels.mind_ssc(torch.ones(1, 1, 4, 5, 6), 1, 2), torch.ones(1, 12, 4, 5, 6)
    )
    out = kernels.mind_ssc(torch.rand(1, 1, 8, 9, 10) * 400 - 100, 1, 2)
    assert (out > 0).all() and (out <= 1).all()
    torch.testing.assert_close(out.amax(dim=1), torch.ones(1, 8, 9, 10))


def test_strided_input():
    image = torch.rand(1, 1, 6, 7, 8).transpose(2, 4)  # (1, 1, 8, 7, 6), not contiguous
    torch.testing.assert_close(
        kernels.mind_ssc(image, 1, 2), mind_ssc(image, backend="torch"), rtol=0, atol=2e-5
    )


def test_dispatch():
    image = torch.rand(1, 1, 6, 5, 4)
    torch.testing.assert_close(mind_ssc(image), kernels.mind_ssc(image, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(
        mind_ssc(image, backend="numba"), kernels.mind_ssc(image, 1, 2), rtol=0, atol=0
    )
    # float64 and graphs take the torch path under "auto"; "numba" refuses them
    assert torch.equal(mind_ssc(image.double()), mind_ssc(image.double(), backend="torch"))
    leaf = image.clone().requires_grad_()
    out = mind_ssc(leaf)
    assert out.requires_grad
    out.sum().backward()
    assert leaf.grad is not None
    with pytest.raises(ValueError, match="float32"):
        mind_ssc(image.double(), backend="numba")
    with pytest.raises(ValueError, match="backend must be one of"):
        mind_ssc(image, backend="fast")
