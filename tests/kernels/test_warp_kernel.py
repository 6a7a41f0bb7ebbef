"""Numba trilinear warp, composition and scaling and squaring against torch's grid_sample."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import kernels  # noqa: E402
from voxelopt.transform import compose, integrate_velocity, warp  # noqa: E402

SHAPES = [(5, 6, 7), (3, 3, 3), (1, 4, 6), (7, 1, 2), (2, 9, 1)]


def _field(batch, shape, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, *shape, generator=g) - 0.5) * 2 * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("scale", [0.7, 4.0])  # within the volume, and far beyond its edges
def test_warp_equals_torch(shape, batch, padding, scale):
    image = torch.rand(batch, 4, *shape)
    disp = _field(batch, shape, scale)
    out = kernels.warp(image, disp, padding)
    assert out.shape == image.shape
    assert torch.equal(out, warp(image, disp, padding_mode=padding))
    assert torch.equal(warp(image, disp, padding_mode=padding, backend="numba"), out)


def test_warp_broadcasts_a_batch_one_image():
    image = torch.rand(1, 2, 5, 6, 7)
    disp = _field(3, (5, 6, 7), 1.5)
    assert torch.equal(
        warp(image, disp, backend="numba"), warp(image.expand(3, -1, -1, -1, -1), disp)
    )


def test_zero_field_is_identity():
    image = torch.rand(2, 3, 6, 5, 4)
    torch.testing.assert_close(kernels.warp(image, torch.zeros(2, 3, 6, 5, 4)), image)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_compose_equals_torch(shape, batch, padding):
    first, second = _field(batch, shape, 2.0, 1), _field(batch, shape, 2.0, 2)
    expected = compose(first, second, padding)
    assert torch.equal(kernels.compose(first, second, padding), expected)
    assert torch.equal(compose(first, second, padding, backend="numba"), expected)


@pytest.mark.parametrize("shape", [(5, 6, 7), (8, 3, 1)])
@pytest.mark.parametrize("steps", [0, 1, 7])
def test_integrate_equals_torch(shape, steps):
    velocity = _field(2, shape, 3.0, 4)
    expected = integrate_velocity(velocity, steps)
    out = integrate_velocity(velocity, steps, backend="numba")
    assert torch.equal(out, expected)
    assert out.data_ptr() != velocity.data_ptr()


def test_unsupported_modes():
    image, disp = torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="bilinear"):
        warp(image, disp, mode="nearest", backend="numba")
    with pytest.raises(ValueError, match="bilinear"):
        warp(image, disp, padding_mode="reflection", backend="numba")
    # "auto" leaves them to torch
    assert torch.equal(warp(image, disp, mode="nearest", backend="auto"), image)


@pytest.mark.parametrize(
    "shape, out_shape, spread",
    [((5, 6, 7), (4, 5, 6), 1.0), ((9, 8, 10), (9, 8, 10), 1.3), ((3, 4, 5), (6, 6, 6), 2.5),
     ((1, 4, 6), (3, 3, 3), 1.0), ((12, 11, 10), (5, 4, 3), 0.2)],
)  # fmt: skip
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_grid_sample_equals_torch(shape, out_shape, spread, mode):
    """Positions inside, on the edges and far outside (zero padding); halves for nearest."""
    from voxelopt.transform import grid_sample_3d

    g = torch.Generator().manual_seed(hash((shape, out_shape, mode)) % 2**31)
    image = torch.rand(*shape, generator=g)
    grid = (torch.rand(1, *out_shape, 3, generator=g) * 2 - 1) * spread
    grid[0, 0, 0, 0] = torch.tensor([-1.0, 1.0, 0.0])  # corners exactly
    expected = grid_sample_3d(image[None, None], grid, mode=mode, padding_mode="zeros")[0, 0]
    out = kernels.grid_sample(image, grid[0], mode)
    assert out.shape == out_shape and torch.equal(out, expected)


def test_grid_sample_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        kernels.grid_sample(torch.rand(3, 3, 3), torch.zeros(2, 2, 2, 3), "bicubic")
