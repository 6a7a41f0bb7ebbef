"""Numba Gaussian filtering along one axis against scipy.ndimage.gaussian_filter1d: bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba", reason="numba is not installed")

from scipy import ndimage  # noqa: E402

from voxelopt import kernels  # noqa: E402
from voxelopt.separable import TRUNCATE, filter_block_axis  # noqa: E402

SHAPES = [(7, 5, 9), (1, 6, 4), (13, 1, 2), (3, 3, 70), (5, 130, 3), (2, 2)]


def _scipy(a, sigma, axis):
    return ndimage.gaussian_filter1d(
        a, sigma, axis=axis, mode="nearest", truncate=TRUNCATE, output=np.float32
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.8, 3.3])
@pytest.mark.parametrize("order", ["C", "F"])
def test_equals_scipy(shape, sigma, order):
    rng = np.random.default_rng(len(shape) * 100 + int(10 * sigma))
    a = np.asarray(rng.normal(size=shape) * 300, dtype=np.float32, order=order)
    for axis in range(a.ndim):
        out = kernels.gaussian_filter1d(a, sigma, axis, TRUNCATE)
        assert out.shape == a.shape and out.dtype == np.float32
        assert np.array_equal(out, _scipy(a, sigma, axis))


def test_strided_view_and_negative_axis():
    a = np.random.default_rng(0).normal(size=(6, 8, 10)).astype(np.float32)[::2, :, ::-1]
    assert np.array_equal(kernels.gaussian_filter1d(a, 1.2, -1, TRUNCATE), _scipy(a, 1.2, 2))


def test_plain_reference():
    """Independent of scipy: replicated ends, normalised Gaussian weights cut at 4 sigma."""
    x = np.random.default_rng(1).normal(size=(1, 9, 1)).astype(np.float32)
    sigma, r = 1.0, 4
    w = np.exp(-0.5 * np.arange(-r, r + 1) ** 2 / sigma**2)
    w /= w.sum()
    padded = np.pad(x[0, :, 0].astype(np.float64), r, mode="edge")
    expected = np.array([np.dot(padded[i : i + 2 * r + 1], w) for i in range(9)])
    out = kernels.gaussian_filter1d(x, sigma, 1, TRUNCATE)[0, :, 0]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_filter_block_axis_uses_it():
    a = np.random.default_rng(2).normal(size=(5, 6, 7)).astype(np.float32)
    assert np.array_equal(filter_block_axis(a, 1.5, 1), _scipy(a, 1.5, 1))
