"""HU windowing and the raw-intensity extractor."""

from __future__ import annotations

import pytest
import torch

from voxelopt.features import RawIntensity, build_extractor, window


@pytest.mark.parametrize("low, high", [(-500.0, 800.0), (-1000.0, 1000.0), (0.0, 1.0)])
def test_window_matches_reference(low, high, dtype):
    hu = torch.linspace(-2000, 2000, 101, dtype=dtype)
    expected = torch.tensor(
        [min(max((v - low) / (high - low), 0.0), 1.0) for v in hu.tolist()], dtype=dtype
    )
    out = window(hu, low, high)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)


def test_window_defaults_and_bounds():
    out = window(torch.tensor([-1000.0, -500.0, 150.0, 800.0, 3000.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_window_integer_input():
    assert window(torch.tensor([-500, 800], dtype=torch.int32)).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("low, high", [(800.0, -500.0), (10.0, 10.0)])
def test_window_rejects_bad_bounds(low, high):
    with pytest.raises(ValueError, match="low < high"):
        window(torch.zeros(3), low, high)
    with pytest.raises(ValueError, match="low < high"):
        RawIntensity(low, high)


def test_raw_extractor(device):
    ext = RawIntensity(low=-100.0, high=100.0).to(device)
    hu = torch.randn(2, 1, 4, 5, 6, device=device) * 200
    out = ext(hu)
    assert out.shape == (2, 1, 4, 5, 6)
    assert ext.out_channels == 1 and ext.pair_normalize is False
    torch.testing.assert_close(out, ((hu.clamp(-100, 100) + 100) / 200))
    assert isinstance(build_extractor("raw"), RawIntensity)


def test_raw_extractor_gradcheck():
    hu = (torch.rand(1, 1, 3, 3, 3, dtype=torch.float64) * 1000 - 400).requires_grad_()
    assert torch.autograd.gradcheck(RawIntensity(), (hu,))
