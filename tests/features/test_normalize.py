"""Joint per-sample pair normalisation."""

from __future__ import annotations

import pytest
import torch

from voxelopt.features import normalize_pair


def _reference(f, m):
    """Plain loops: L2 over channels, then per sample and channel a joint min-max."""
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-8)
    fo, mo = torch.empty_like(f), torch.empty_like(m)
    for b in range(f.shape[0]):
        for c in range(f.shape[1]):
            both = torch.cat([f[b, c].flatten(), m[b, c].flatten()])
            lo, hi = both.min(), both.max()
            fo[b, c] = (f[b, c] - lo) / (hi - lo)
            mo[b, c] = (m[b, c] - lo) / (hi - lo)
    return fo, mo


@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 6), (2, 9, 3, 3, 3), (3, 1, 2, 4, 3)])
def test_matches_reference(shape, dtype):
    f = torch.randn(shape, dtype=dtype)
    m = torch.randn(shape, dtype=dtype) * 3 + 1
    fo, mo = normalize_pair(f, m)
    fr, mr = _reference(f, m)
    torch.testing.assert_close(fo, fr)
    torch.testing.assert_close(mo, mr)
    both = torch.cat([fo, mo], dim=2)
    assert both.amin(dim=(2, 3, 4)).abs().max() < 1e-6
    assert (both.amax(dim=(2, 3, 4)) - 1).abs().max() < 1e-5


def test_batch_equals_singles():
    f = torch.randn(2, 4, 3, 4, 5)
    m = torch.randn(2, 4, 3, 4, 5)
    m[1] *= 10  # very different ranges per sample
    fo, mo = normalize_pair(f, m)
    for b in range(2):
        fs, ms = normalize_pair(f[b : b + 1], m[b : b + 1])
        torch.testing.assert_close(fo[b : b + 1], fs)
        torch.testing.assert_close(mo[b : b + 1], ms)


def test_different_grids_and_constant_channel():
    f = torch.ones(1, 2, 3, 3, 3)
    m = torch.ones(1, 2, 4, 2, 5)
    fo, mo = normalize_pair(f, m)
    assert fo.shape == f.shape and mo.shape == m.shape
    assert torch.isfinite(fo).all() and torch.isfinite(mo).all()


@pytest.mark.parametrize(
    "f, m, err, match",
    [
        (torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, 3), ValueError, "fixed_feat"),
        (torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 3, 3, 3, 3), ValueError, "share"),
        (torch.zeros(2, 2, 3, 3, 3), torch.zeros(1, 2, 3, 3, 3), ValueError, "share"),
        (
            torch.zeros(1, 2, 3, 3, 3, dtype=torch.int64),
            torch.zeros(1, 2, 3, 3, 3),
            TypeError,
            "floating",
        ),
        (torch.zeros(1, 2, 3, 3, 3), "x", TypeError, "moving_feat"),
    ],
)
def test_invalid(f, m, err, match):
    with pytest.raises(err, match=match):
        normalize_pair(f, m)


def test_gradcheck():
    f = torch.randn(2, 3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(normalize_pair, (f, m))
