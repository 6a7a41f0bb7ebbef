"""FeatureExtractor: input validation and the frozen switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from voxelopt.features import FeatureExtractor, check_image


class _Scale(FeatureExtractor):
    """A tiny pretrained-like extractor: a 1x1x1 conv followed by BatchNorm."""

    def __init__(self, frozen: bool = True) -> None:
        super().__init__(out_channels=2, pair_normalize=True)
        self.conv = nn.Conv3d(1, 2, 1)
        self.bn = nn.BatchNorm3d(2)
        if frozen:
            self.freeze()

    def extract(self, image_hu):
        return self.bn(self.conv(image_hu))


def test_smoke_shape_and_attributes():
    ext = _Scale()
    out = ext(torch.randn(2, 1, 4, 5, 6))
    assert out.shape == (2, 2, 4, 5, 6)
    assert ext.out_channels == 2 and ext.pair_normalize is True


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.zeros(1, 4, 4, 4), ValueError, "B, 1, D, H, W"),
        (torch.zeros(1, 2, 4, 4, 4), ValueError, "B, 1, D, H, W"),
        (torch.zeros(1, 1, 0, 4, 4), ValueError, "empty"),
        (torch.tensor(float("nan")).expand(1, 1, 2, 2, 2), ValueError, "NaN"),
        (torch.full((1, 1, 2, 2, 2), float("inf")), ValueError, "infinite"),
        (torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool), TypeError, "real-valued"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_invalid_input(bad, err, match):
    with pytest.raises(err, match=match):
        _Scale()(bad)


def test_integer_input_is_cast():
    x = check_image(torch.zeros(1, 1, 2, 2, 2, dtype=torch.int32))
    assert x.dtype == torch.get_default_dtype()


def test_out_channels_validated():
    with pytest.raises(ValueError, match="out_channels"):
        FeatureExtractor(out_channels=0)


def test_extract_not_implemented():
    with pytest.raises(NotImplementedError):
        FeatureExtractor(out_channels=1)(torch.zeros(1, 1, 2, 2, 2))


def test_frozen_by_default_stays_eval_under_parent_train():
    ext = _Scale()
    parent = nn.ModuleDict({"features": ext, "other": nn.BatchNorm3d(1)})
    parent.train()
    assert ext.frozen and not ext.training and not ext.bn.training
    assert parent["other"].training
    assert all(not p.requires_grad for p in ext.parameters())
    # eval mode: running statistics are neither used from the batch nor updated
    before = ext.bn.running_mean.clone()
    ext(torch.randn(1, 1, 3, 3, 3) * 10 + 5)
    assert torch.equal(ext.bn.running_mean, before)


def test_unfreeze_and_constructor_flag():
    ext = _Scale().unfreeze()
    assert not ext.frozen and all(p.requires_grad for p in ext.parameters())
    ext.train()
    assert ext.training and ext.bn.training
    free = _Scale(frozen=False)
    assert not free.frozen and all(p.requires_grad for p in free.parameters())
    free.freeze()
    assert not free.training and all(not p.requires_grad for p in free.parameters())


def test_frozen_still_passes_gradient_to_input():
    ext = _Scale()
    x = torch.randn(1, 1, 3, 3, 3, requires_grad=True)
    ext(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ext.parameters())
