"""Trainable feature heads and the frozen-backbone composition."""

from __future__ import annotations

import pytest
import torch

from voxelopt.features import FeatureHead, HeadedExtractor, MindSSC, RawIntensity


@pytest.mark.parametrize(
    "cin, cout, width, depth", [(1, 1, 4, 1), (1, 4, 4, 2), (12, 8, 4, 3), (9, 9, 16, 2)]
)
def test_identity_like_at_init(cin, cout, width, depth):
    head = FeatureHead(cin, cout, width, depth)
    x = torch.randn(2, cin, 4, 5, 3)
    out = head(x)
    assert out.shape == (2, cout, 4, 5, 3)
    expected = torch.stack([x[:, c % cin] for c in range(cout)], dim=1)
    torch.testing.assert_close(out, expected)


def test_residual_receives_gradient_after_one_step():
    torch.manual_seed(0)
    head = FeatureHead(2, 3, width=4, depth=2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    x = torch.randn(1, 2, 4, 4, 4)
    target = torch.randn(1, 3, 4, 4, 4)
    for _ in range(2):
        opt.zero_grad()
        ((head(x) - target) ** 2).mean().backward()
        opt.step()
    first = head.residual[0].weight.grad
    assert first is not None and first.abs().sum() > 0
    assert head.residual[-1].weight.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 0}, {"out_channels": -1}, {"width": 0}, {"depth": 0}]
)
def test_invalid_arguments(kwargs):
    args = {"in_channels": 1, "out_channels": 2, "width": 4, "depth": 2} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FeatureHead(**args)


def test_wrong_input_channels():
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        FeatureHead(3, 3)(torch.zeros(1, 2, 4, 4, 4))


def test_gradcheck():
    torch.manual_seed(0)
    head = FeatureHead(2, 3, width=2, depth=2).double()
    for p in head.parameters():  # leave the zero init so the residual path matters
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (x,), fast_mode=True)


def test_headed_extractor_trains_only_the_head():
    backbone = MindSSC(radius=1, dilation=1)
    backbone.unfreeze()
    ext = HeadedExtractor(backbone, FeatureHead(12, 4, width=4))
    assert ext.out_channels == 4 and ext.pair_normalize is False
    assert backbone.frozen
    ext.train()
    assert ext.head.training and not ext.backbone.training
    hu = torch.randn(1, 1, 6, 6, 6) * 300
    out = ext(hu)
    assert out.shape == (1, 4, 6, 6, 6)
    torch.testing.assert_close(out, backbone(hu)[:, :4])
    out.sum().backward()
    assert all(p.grad is not None for p in ext.head.parameters())


def test_headed_extractor_pair_normalize_override_and_errors():
    raw = RawIntensity()
    assert HeadedExtractor(raw, FeatureHead(1, 2), pair_normalize=True).pair_normalize
    with pytest.raises(ValueError, match="in_channels"):
        HeadedExtractor(raw, FeatureHead(2, 2))
    with pytest.raises(TypeError, match="backbone"):
        HeadedExtractor(torch.nn.Identity(), FeatureHead(1, 2))
    with pytest.raises(TypeError, match="head"):
        HeadedExtractor(raw, torch.nn.Conv3d(1, 2, 1))
