"""Displacement entropy and the sigma map."""

from __future__ import annotations

import math

import pytest
import torch

from voxelopt.entropy import displacement_entropy, sigma_map


def reference_entropy(cost: torch.Tensor, beta: float, floor: float) -> torch.Tensor:
    b, k = cost.shape[:2]
    flat = cost.permute(0, 2, 3, 4, 1).reshape(-1, k).tolist()
    values = []
    for row in flat:
        z = [math.exp(-c / beta) for c in row]
        p = [max(min(v / sum(z), 1.0), floor) for v in z]
        s = sum(p)
        p = [v / s for v in p]
        values.append(-sum(v * math.log(v) for v in p))
    return torch.tensor(values, dtype=cost.dtype).view(b, *cost.shape[2:]).unsqueeze(1)


class TestEntropy:
    def test_smoke(self, dtype):
        e = displacement_entropy(torch.rand(2, 27, 3, 4, 5, dtype=dtype))
        assert e.shape == (2, 1, 3, 4, 5) and e.dtype == dtype

    @pytest.mark.parametrize("beta", [0.1, 1.0])
    @pytest.mark.parametrize("floor", [1e-6, 1e-2])
    def test_against_reference(self, beta, floor):
        cost = torch.rand(2, 27, 2, 3, 2, dtype=torch.float64)
        torch.testing.assert_close(
            displacement_entropy(cost, beta, floor), reference_entropy(cost, beta, floor)
        )

    @pytest.mark.parametrize("block", [5, 12, 1 << 14])
    @pytest.mark.parametrize("graph", [False, True])
    def test_blocks_and_graph_path_against_reference(self, monkeypatch, block, graph):
        # Without a graph the entropy is computed a block of voxels at a time (12 voxels per
        # sample here: blocks of 5 leave a remainder); with one, on the whole volume.
        import voxelopt.entropy as entropy

        monkeypatch.setattr(entropy, "_BLOCK", block)
        cost = (torch.rand(2, 27, 2, 3, 2, dtype=torch.float64) * 3).requires_grad_(graph)
        out = displacement_entropy(cost, 0.1, 1e-6)
        torch.testing.assert_close(out.detach(), reference_entropy(cost.detach(), 0.1, 1e-6))

    def test_uniform_cost_is_max_entropy(self):
        e = displacement_entropy(torch.full((1, 27, 2, 2, 2), 0.3))
        torch.testing.assert_close(e, torch.full_like(e, math.log(27)))

    def test_sharp_minimum_is_low_entropy(self):
        cost = torch.ones(1, 27, 2, 2, 2)
        cost[:, 5] = 0.0
        assert displacement_entropy(cost, beta=0.01).max() < 1e-3

    def test_gradcheck(self):
        cost = torch.rand(1, 8, 2, 2, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda c: displacement_entropy(c, 0.5, 1e-6), (cost,))

    def test_exceptions(self):
        with pytest.raises(ValueError, match="cost"):
            displacement_entropy(torch.rand(27, 4, 4, 4))
        with pytest.raises(ValueError, match="beta"):
            displacement_entropy(torch.rand(1, 27, 2, 2, 2), beta=0.0)


class TestSigmaMap:
    def test_reference_extremes(self):
        e = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64)
        s = sigma_map(e, "reference", 0.1, 0.5)
        assert s.flatten()[e.argmin()] == pytest.approx(0.1)
        assert s.flatten()[e.argmax()] == pytest.approx(0.5)

    def test_reference_formula(self):
        e = torch.rand(1, 1, 3, 3, 3, dtype=torch.float64)
        n = (e - e.min()) / (e.max() - e.min())
        expected = 0.2 + torch.log2(n + 1) * (0.7 - 0.2)
        torch.testing.assert_close(sigma_map(e, "reference", 0.2, 0.7), expected)

    def test_paper_formula(self):
        e = torch.rand(1, 1, 3, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(
            sigma_map(e, "paper", alpha=1.5), 1.5 * torch.log(e / e.max() + 1)
        )

    @pytest.mark.parametrize("mode", ["reference", "paper"])
    def test_per_sample(self, mode):
        e = torch.rand(2, 1, 3, 4, 5, dtype=torch.float64)
        e[1] *= 7.0
        batch = sigma_map(e, mode)
        singles = torch.cat([sigma_map(e[i : i + 1], mode) for i in range(2)])
        torch.testing.assert_close(batch, singles)

    def test_constant_entropy_is_finite(self):
        s = sigma_map(torch.ones(1, 1, 2, 2, 2), "reference")
        assert torch.isfinite(s).all()

    def test_gradcheck(self):
        e = torch.rand(1, 1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: sigma_map(x, "paper"), (e,))

    def test_exceptions(self):
        with pytest.raises(ValueError, match="mode"):
            sigma_map(torch.rand(1, 1, 2, 2, 2), "other")
        with pytest.raises(ValueError, match="entropy"):
            sigma_map(torch.rand(1, 2, 2, 2, 2))
