"""MIND-SSC against a plain loop implementation of the published definition."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from voxelopt.features import MindSSC, build_extractor, mind_ssc
from voxelopt.features.mind import MIND_PAIRS


def _reference(img: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """Voxel by voxel: replicated borders, 12 pair SSDs, min-shift, variance, exp, max-norm."""
    d_, h_, w_ = img.shape
    six = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    pairs = [
        (p, q)
        for p, q in itertools.combinations(six, 2)
        if sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) == 2
    ]

    def at(z, y, x):
        return img[min(max(z, 0), d_ - 1), min(max(y, 0), h_ - 1), min(max(x, 0), w_ - 1)]

    # squared difference of each pair at every voxel
    sq = np.zeros((12, d_, h_, w_))
    for c, (p, q) in enumerate(pairs):
        for z, y, x in itertools.product(range(d_), range(h_), range(w_)):
            a = at(z + dilation * p[0], y + dilation * p[1], x + dilation * p[2])
            b = at(z + dilation * q[0], y + dilation * q[1], x + dilation * q[2])
            sq[c, z, y, x] = (a - b) ** 2
    # patch distance: mean over the box, replicated borders
    dist = np.zeros_like(sq)
    k = 2 * radius + 1
    for z, y, x in itertools.product(range(d_), range(h_), range(w_)):
        total = np.zeros(12)
        for s in itertools.product(range(-radius, radius + 1), repeat=3):
            zz = min(max(z + s[0], 0), d_ - 1)
            yy = min(max(y + s[1], 0), h_ - 1)
            xx = min(max(x + s[2], 0), w_ - 1)
            total += sq[:, zz, yy, xx]
        dist[:, z, y, x] = total / k**3
    dist = dist - dist.min(axis=0)
    var = dist.mean(axis=0)
    mv = var.mean()
    var = np.clip(var, mv * 1e-3, mv * 1e3)
    mind = np.exp(-dist / var)
    return mind / mind.max(axis=0)


def test_pairs_are_the_twelve_sqrt2_edges():
    assert len(MIND_PAIRS) == 12 and len(set(MIND_PAIRS)) == 12
    for p, q in MIND_PAIRS:
        dist = math.dist(p, q)
        assert dist == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("radius, dilation", [(1, 2), (0, 1), (1, 1), (2, 1)])
def test_matches_reference(radius, dilation):
    gen = torch.Generator().manual_seed(radius * 10 + dilation)
    img = torch.rand(1, 1, 5, 6, 4, dtype=torch.float64, generator=gen)
    out = mind_ssc(img, radius, dilation)
    ref = _reference(img[0, 0].numpy(), radius, dilation)
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_shape_range_and_batch(dtype):
    img = torch.rand(2, 1, 6, 7, 8, dtype=dtype)
    out = mind_ssc(img)
    assert out.shape == (2, 12, 6, 7, 8) and out.dtype == dtype
    assert (out > 0).all() and (out <= 1).all()
    torch.testing.assert_close(out.amax(dim=1), torch.ones(2, 6, 7, 8, dtype=dtype))
    torch.testing.assert_close(out[1:], mind_ssc(img[1:]))


def test_contrast_invariance():
    """MIND depends on local self-similarity, not on the intensity scale or offset."""
    img = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(mind_ssc(img), mind_ssc(3.0 * img + 7.0))


def test_constant_image_is_finite():
    out = mind_ssc(torch.ones(1, 1, 4, 4, 4))
    torch.testing.assert_close(out, torch.ones(1, 12, 4, 4, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"radius": -1}, "radius"), ({"dilation": 0}, "dilation"), ({"radius": 1.5}, "radius")],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mind_ssc(torch.rand(1, 1, 4, 4, 4), **kwargs)
    with pytest.raises(ValueError, match=match):
        MindSSC(**kwargs)


def test_invalid_image():
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        mind_ssc(torch.rand(1, 2, 4, 4, 4))


def test_gradcheck():
    img = torch.rand(1, 1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, 1, 1), (img,), fast_mode=True)


def test_extractor_windows_first(device):
    ext = build_extractor("mind", radius=1, dilation=2).to(device)
    hu = torch.randn(1, 1, 8, 8, 8, device=device) * 400
    out = ext(hu)
    assert ext.out_channels == 12 and ext.pair_normalize is False
    assert out.shape == (1, 12, 8, 8, 8)
    torch.testing.assert_close(out, mind_ssc((hu.clamp(-500, 800) + 500) / 1300))
