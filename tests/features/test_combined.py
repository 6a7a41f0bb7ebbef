"""Combined extractors: name parsing, per-branch normalisation and weighting, the cost."""

from __future__ import annotations

import math

import pytest
import torch

from voxelopt.cost import cost_volume
from voxelopt.features import (
    CachedExtractor,
    CombinedExtractor,
    FeatureExtractor,
    MindSSC,
    RawIntensity,
    available_extractors,
    base_extractors,
    build_extractor,
    parse_extractor_name,
)
from voxelopt.features.combined import branch_scales, split_combined_name
from voxelopt.registration import VoxelOptRegistration


class _Toy(FeatureExtractor):
    """Three pair-normalised channels: HU, HU^2 / 1000 and a shifted copy (like a network)."""

    def __init__(self) -> None:
        super().__init__(out_channels=3, pair_normalize=True)

    def extract(self, image_hu):
        return torch.cat([image_hu, image_hu**2 / 1000.0, image_hu.roll(1, dims=2) + 5.0], 1)


def _reference_normalize(f: torch.Tensor, m: torch.Tensor):
    """Plain joint normalisation: L2 over channels, then per channel min-max over both."""
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-8)
    out_f, out_m = torch.empty_like(f), torch.empty_like(m)
    for b in range(f.shape[0]):
        for c in range(f.shape[1]):
            lo = min(f[b, c].min(), m[b, c].min())
            hi = max(f[b, c].max(), m[b, c].max())
            out_f[b, c] = (f[b, c] - lo) / (hi - lo)
            out_m[b, c] = (m[b, c] - lo) / (hi - lo)
    return out_f, out_m


def _images(shape=(2, 1, 7, 8, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64) * 1400 - 1000
    moving = torch.rand(shape, generator=g, dtype=torch.float64) * 1400 - 1000
    return fixed, moving


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name, expected",
    [
        ("mind", (("mind", None),)),
        ("MIND+Obelisk", (("mind", None), ("obelisk", None))),
        ("mind+obelisk:0.5", (("mind", None), ("obelisk", 0.5))),
        (" mind : 2 + obelisk_decoder ", (("mind", 2.0), ("obelisk_decoder", None))),
        ("raw:0+mind:1e-1", (("raw", 0.0), ("mind", 0.1))),
    ],
)
def test_parse_names(name, expected):
    assert split_combined_name(name) == expected
    assert parse_extractor_name(name) == expected


@pytest.mark.parametrize(
    "name, error, match",
    [
        ("mind+sift", ValueError, r"unknown feature extractor 'sift' in 'mind\+sift'"),
        (
            "sift",
            ValueError,
            "valid names: mind, mind_obelisk_head, obelisk, raw, universal; variants: obelisk_",
        ),
        ("mind+obelisk:x", ValueError, "bad weight 'x' of branch 'obelisk'"),
        ("mind+obelisk:", ValueError, "bad weight '' of branch 'obelisk'"),
        ("mind:-1+obelisk", ValueError, "bad weight '-1' of branch 'mind'"),
        ("mind+obelisk:nan", ValueError, "finite number >= 0"),
        ("mind+obelisk:inf", ValueError, "finite number >= 0"),
        ("mind:1:2+raw", ValueError, "bad weight '1:2'"),
        ("mind++raw", ValueError, "empty branch"),
        ("", ValueError, "empty branch"),
        ("mind:0+raw:0", ValueError, "every branch weight 0"),
        (3, TypeError, "must be a string"),
    ],
)
def test_parse_errors(name, error, match):
    with pytest.raises(error, match=match):
        parse_extractor_name(name)
    with pytest.raises(error, match=match):
        build_extractor(name)


def test_available_names():
    names = available_extractors()
    assert names == sorted(names)
    assert {"raw", "mind", "obelisk", "universal", "obelisk_decoder"} <= set(names)
    for name in names:
        assert parse_extractor_name(name) == ((name, None),)
    assert base_extractors("Mind+obelisk_decoder:0.5+raw") == ("mind", "obelisk", "raw")


def test_build_combined_by_name():
    ext = build_extractor("MIND+raw:0.5")
    assert isinstance(ext, CombinedExtractor)
    assert isinstance(ext.branches[0], MindSSC) and isinstance(ext.branches[1], RawIntensity)
    assert ext.names == ("mind", "raw") and ext.weights == (1.0, 0.5)
    assert ext.out_channels == 13 and ext.pair_normalize is False
    assert "mind:1, raw:0.5" in repr(ext)


def test_kwargs_are_routed_to_the_branches_that_take_them():
    ext = build_extractor("mind+raw", low=-100.0, high=200.0, radius=2)
    mind, raw = ext.branches
    assert (mind.low, mind.high, raw.low, raw.high) == (-100.0, 200.0, -100.0, 200.0)
    assert mind.radius == 2
    ext = build_extractor("mind+raw", branch_kwargs={"raw": {"low": 0.0}})
    assert ext.branches[1].low == 0.0 and ext.branches[0].low != 0.0
    with pytest.raises(TypeError, match="no branch of the combined extractor takes .*'crop'"):
        build_extractor("mind+raw", crop="body")
    with pytest.raises(ValueError, match="branch_kwargs names \\['obelisk'\\]"):
        build_extractor("mind+raw", branch_kwargs={"obelisk": {}})


def test_branch_weights_keyword():
    a = build_extractor("mind+raw", branch_weights=[2.0, 0.5])
    b = build_extractor("mind:2+raw:0.5")
    assert a.weights == b.weights and a.scales == b.scales
    with pytest.raises(ValueError, match="not both"):
        build_extractor("mind+raw:0.5", branch_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="2 numbers"):
        build_extractor("mind+raw", branch_weights=[1.0])


def test_constructor_errors():
    with pytest.raises(TypeError, match="FeatureExtractor"):
        CombinedExtractor([MindSSC(), torch.nn.Identity()])
    with pytest.raises(TypeError, match="non-empty"):
        CombinedExtractor([])
    with pytest.raises(ValueError, match="not all zero"):
        CombinedExtractor([MindSSC(), RawIntensity()], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="not all zero"):
        CombinedExtractor([MindSSC(), RawIntensity()], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="names must hold 2"):
        CombinedExtractor([MindSSC(), RawIntensity()], names=["mind"])


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("balance", [True, False])
def test_equals_manual_concatenation_of_normalised_branches(weights, balance):
    mind = MindSSC()
    ext = CombinedExtractor([mind, _Toy()], weights=weights, balance=balance)
    fixed, moving = _images()
    f, m = ext.extract_pair(fixed, moving)
    # the reference: MIND as it is, the toy branch jointly normalised, each times its scale
    tf, tm = _reference_normalize(_Toy().extract(fixed), _Toy().extract(moving))
    if balance:
        s_mind = weights[0] / sum(weights) * 15 / 12
        s_toy = weights[1] / sum(weights) * 15 / 3
    else:
        s_mind, s_toy = weights
    expected_f = torch.cat([s_mind * mind(fixed), s_toy * tf], 1)
    expected_m = torch.cat([s_mind * mind(moving), s_toy * tm], 1)
    assert f.shape == (2, 15, 7, 8, 6)
    torch.testing.assert_close(f, expected_f)
    torch.testing.assert_close(m, expected_m)
    assert ext.scales == pytest.approx((s_mind, s_toy))


def test_forward_is_the_raw_concatenation():
    fixed, _ = _images()
    ext = CombinedExtractor([MindSSC(), _Toy()], weights=[1.0, 3.0])
    torch.testing.assert_close(ext(fixed), torch.cat([MindSSC()(fixed), _Toy()(fixed)], 1))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0), (3.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("balance", [True, False])
def test_weights_scale_the_cost_contribution(weights, balance):
    """Cost = sum_k (w_k / sum w) cost_k (balanced) or sum_k w_k (C_k / C) cost_k (plain)."""
    fixed, moving = _images((1, 1, 8, 7, 9), seed=3)
    branches = [MindSSC(), _Toy()]
    ext = CombinedExtractor(branches, weights=weights, balance=balance)
    combined = cost_volume(*ext.extract_pair(fixed, moving), kernel_size=1)
    costs = [cost_volume(*b.extract_pair(fixed, moving), kernel_size=1) for b in branches]
    if balance:
        factors = [w / sum(weights) for w in weights]
    else:
        factors = [w * c / 15 for w, c in zip(weights, (12, 3), strict=True)]
    expected = sum(f * c for f, c in zip(factors, costs, strict=True))
    torch.testing.assert_close(combined, expected)


def test_one_branch_with_any_weight_is_that_extractor():
    fixed, moving = _images()
    ext = build_extractor("mind:0.3")
    assert isinstance(ext, CombinedExtractor) and ext.scales == (1.0,)
    pairs = zip(ext.extract_pair(fixed, moving), MindSSC().extract_pair(fixed, moving), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b)


def test_branch_scales_formula():
    assert branch_scales([12, 9], [1, 1]) == pytest.approx((21 / 24, 21 / 18))
    assert branch_scales([12, 9], [2, 1], balance=False) == (2.0, 1.0)
    with pytest.raises(ValueError, match="one length"):
        branch_scales([12, 9], [1.0])
    with pytest.raises(ValueError, match="not all zero"):
        branch_scales([12], [math.inf])


def test_prepare_pair_checks_channels():
    ext = CombinedExtractor([MindSSC(), _Toy()])
    f = torch.rand(1, 14, 4, 4, 4)
    with pytest.raises(ValueError, match=r"fixed_feat must have 15 channels \(12 \+ 3"):
        ext.prepare_pair(f, f)
    with pytest.raises(TypeError, match="floating"):
        ext.prepare_pair(torch.zeros(1, 15, 4, 4, 4, dtype=torch.long), torch.rand(1, 15, 4, 4, 4))


def test_prepare_pair_batch_is_per_pair():
    fixed, moving = _images()
    ext = CombinedExtractor([MindSSC(), _Toy()], weights=[1.0, 2.0])
    f, m = ext.extract_pair(fixed, moving)
    f1, m1 = ext.extract_pair(fixed[1:], moving[1:])
    torch.testing.assert_close(f[1:], f1)
    torch.testing.assert_close(m[1:], m1)


def test_prepare_pair_gradcheck():
    ext = CombinedExtractor([RawIntensity(), _Toy()], weights=[1.0, 2.0])
    g = torch.Generator().manual_seed(1)
    f = torch.rand(1, 4, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(1, 4, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ext.prepare_pair(a, b), (f, m))


def test_cached_wrapper_prepares_like_the_extractor():
    fixed, moving = _images()
    ext = CombinedExtractor([MindSSC(), _Toy()], weights=[1.0, 2.0])
    cached = CachedExtractor(ext)
    got = cached.prepare_pair(cached(fixed, "f"), cached(moving))
    for a, b in zip(got, ext.extract_pair(fixed, moving), strict=True):
        torch.testing.assert_close(a, b)


def test_registration_prepares_pairs_through_the_extractor():
    """VoxelOptRegistration.features must use prepare_pair (needs the registration hook)."""
    fixed, moving = _images((1, 1, 8, 8, 8))
    model = VoxelOptRegistration("mind+raw:0.5", cache_fixed=2)
    for _ in range(2):  # the second call takes the fixed features from the cache
        got = model.features(fixed, moving, fixed_key="f")
        for a, b in zip(got, model.extractor.extract_pair(fixed, moving), strict=True):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- real weights
@pytest.mark.shared
@pytest.mark.slow
def test_real_mind_plus_obelisk_decoder(ct_dir, obelisk_path):
    """By name with the shipped weights: MIND channels untouched, decoder maps normalised."""
    from voxelopt.data.volumes import load_abdomen_ct

    ct, _ = load_abdomen_ct(downsample=2)
    hu = torch.from_numpy(ct.data)[None, None].float()
    moving = hu.roll(2, dims=2)
    ext = build_extractor("mind+obelisk_decoder:0.5", weights=obelisk_path)
    assert ext.out_channels == 24 and ext.branches[1].layer == "decoder"
    with torch.no_grad():
        f, m = ext.extract_pair(hu, moving)
    s_mind, s_dec = ext.scales
    assert (s_mind, s_dec) == pytest.approx((24 / 12 * 2 / 3, 24 / 12 * 1 / 3))
    torch.testing.assert_close(f[:, :12], s_mind * MindSSC()(hu))
    dec = torch.cat([f[:, 12:], m[:, 12:]], dim=2) / s_dec
    assert dec.amin() >= 0 and dec.amax() <= 1 + 1e-6
    # jointly normalised: every channel spans [0, 1] over the pair
    torch.testing.assert_close(dec.amax(dim=(0, 2, 3, 4)), torch.ones(12), atol=1e-6, rtol=0)
    torch.testing.assert_close(dec.amin(dim=(0, 2, 3, 4)), torch.zeros(12), atol=1e-6, rtol=0)
