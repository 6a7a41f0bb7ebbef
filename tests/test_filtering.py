"""Adaptive and fixed Gaussian message passing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from voxelopt.filtering import adaptive_smooth, side_weight, smooth


def dense_weights(sigma: float) -> list[float]:
    """Normalised 3-tap Gaussian [w_-1, w_0, w_1] from its definition."""
    raw = [math.exp(-(j**2) / (2 * sigma**2)) for j in (-1, 0, 1)]
    return [r / sum(raw) for r in raw]


def reference_smooth(x: torch.Tensor, sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    """Per-voxel loops: three axis passes of a per-voxel 3-tap kernel, zero padding."""
    x = x.clone()
    b, c, d, h, w = x.shape
    for _ in range(iterations):
        for axis in range(3):
            out = torch.zeros_like(x)
            for n, ch, i, j, k in itertools.product(
                range(b), range(c), range(d), range(h), range(w)
            ):
                weights = dense_weights(float(sigma[n, 0, i, j, k]))
                acc = 0.0
                for t, wt in zip((-1, 0, 1), weights, strict=False):
                    pos = [i, j, k]
                    pos[axis] += t
                    if 0 <= pos[axis] < x.shape[2 + axis]:
                        acc += wt * float(x[n, ch, pos[0], pos[1], pos[2]])
                out[n, ch, i, j, k] = acc
            x = out
    return x


class TestSideWeight:
    @pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5, 1.0, 5.0])
    def test_against_dense(self, sigma):
        assert side_weight(sigma) == pytest.approx(dense_weights(sigma)[2])
        t = side_weight(torch.tensor([sigma], dtype=torch.float64))
        assert float(t) == pytest.approx(dense_weights(sigma)[2])

    def test_zero_sigma_keeps_value(self):
        assert side_weight(0.0) == 0.0
        assert float(side_weight(torch.zeros(1))) == 0.0

    def test_negative(self):
        with pytest.raises(ValueError, match="sigma"):
            side_weight(-0.1)


class TestSmooth:
    @pytest.mark.parametrize("iterations", [1, 3])
    @pytest.mark.parametrize("shape", [(3, 4, 5), (1, 3, 2)])
    def test_against_reference(self, iterations, shape):
        x = torch.rand(2, 2, *shape, dtype=torch.float64)
        sigma = 0.1 + torch.rand(2, 1, *shape, dtype=torch.float64)
        expected = reference_smooth(x, sigma, iterations)
        torch.testing.assert_close(adaptive_smooth(x, sigma, iterations), expected)

    @pytest.mark.parametrize("group_channels", [1, 2, 3])
    @pytest.mark.parametrize("adaptive", [True, False])
    def test_channel_groups_match_reference(self, monkeypatch, group_channels, adaptive):
        # Without a graph the channels are filtered a group at a time (cache blocking); any
        # group size, also one that does not divide C, and batches > 1 give the same result.
        import voxelopt.filtering as filtering

        shape = (3, 4, 5)
        monkeypatch.setattr(filtering, "_GROUP_ELEMENTS", group_channels * 60)
        x = torch.rand(2, 5, *shape, dtype=torch.float64)
        sigma = 0.1 + torch.rand(2, 1, *shape, dtype=torch.float64)
        if not adaptive:
            sigma = torch.full_like(sigma, 0.4)
        weight = side_weight(sigma) if adaptive else side_weight(0.4)
        expected = reference_smooth(x, sigma, 2)
        torch.testing.assert_close(smooth(x, weight, 2), expected)
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
        torch.testing.assert_close(smooth(strided, weight, 2, inplace=True), expected)

    def test_fixed_equals_constant_map(self, dtype):
        x = torch.rand(1, 3, 5, 6, 7, dtype=dtype)
        fixed = smooth(x, side_weight(0.5))
        adaptive = adaptive_smooth(x, torch.full((1, 1, 5, 6, 7), 0.5, dtype=dtype))
        torch.testing.assert_close(fixed, adaptive)

    def test_preserves_constant_in_interior(self):
        x = torch.full((1, 1, 12, 12, 12), 2.0)
        out = adaptive_smooth(x, torch.rand(1, 1, 12, 12, 12), iterations=3)
        torch.testing.assert_close(out[..., 3:-3, 3:-3, 3:-3], x[..., 3:-3, 3:-3, 3:-3])

    def test_inplace_only_without_graph(self):
        x = torch.rand(1, 2, 4, 4, 4)
        w = side_weight(torch.rand(1, 1, 4, 4, 4))
        expected = smooth(x, w, 2)
        y = x.clone()
        out = smooth(y, w, 2, inplace=True)
        assert out.data_ptr() == y.data_ptr()
        torch.testing.assert_close(out, expected)
        leaf = x.clone().requires_grad_()
        out = smooth(leaf, w, 2, inplace=True)
        assert out.data_ptr() != leaf.data_ptr()
        torch.testing.assert_close(out.detach(), expected)

    def test_zero_iterations_identity(self):
        x = torch.rand(1, 2, 3, 3, 3)
        assert torch.equal(smooth(x, 0.1, 0), x)

    def test_gradcheck(self):
        x = torch.rand(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        sigma = (0.2 + torch.rand(1, 1, 3, 3, 4, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, s: adaptive_smooth(a, s, 2), (x, sigma))

    def test_exceptions(self):
        with pytest.raises(ValueError, match="weight map"):
            smooth(torch.rand(1, 2, 4, 4, 4), torch.rand(1, 1, 4, 4, 3))
        with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
            smooth(torch.rand(2, 4, 4, 4), 0.1)

    def test_device(self, device):
        x = torch.rand(1, 2, 4, 4, 4, device=device)
        assert smooth(x, side_weight(torch.rand(1, 1, 4, 4, 4, device=device))).device == x.device
