"""One level of the solver: argmin (hard/soft) and the coupled v/u refinement."""

from __future__ import annotations

import itertools

import pytest
import torch

from voxelopt.config import VoxelOptConfig
from voxelopt.cost import cost_volume, search_offsets
from voxelopt.entropy import displacement_entropy, sigma_map
from voxelopt.filtering import adaptive_smooth
from voxelopt.solver import offset_argmin, solve_level


def loop_argmin(cost: torch.Tensor, offsets: torch.Tensor, u=None, gamma=0.0) -> torch.Tensor:
    """argmin_o cost(x, o) + gamma ||u(x) - o||^2 by plain loops (first minimum wins)."""
    b, k, d, h, w = cost.shape
    out = torch.zeros(b, 3, d, h, w, dtype=torch.float64)
    for n, i, j, l in itertools.product(range(b), range(d), range(h), range(w)):
        best, best_o = None, None
        for idx in range(k):
            value = float(cost[n, idx, i, j, l])
            if u is not None:
                value += gamma * float(((u[n, :, i, j, l] - offsets[idx]) ** 2).sum())
            if best is None or value < best:
                best, best_o = value, offsets[idx]
        out[n, :, i, j, l] = best_o
    return out


def reference_level(fixed, moving, cfg: VoxelOptConfig) -> torch.Tensor:
    offsets = search_offsets(cfg.kernel_size, dtype=torch.float64)
    cost = cost_volume(fixed, moving, cfg.kernel_size)
    entropy = displacement_entropy(cost, cfg.beta, cfg.prob_floor)
    sigma = sigma_map(entropy, cfg.sigma_mode, cfg.sigma_low, cfg.sigma_high, cfg.alpha)
    cost = adaptive_smooth(cost, sigma, cfg.smoothing_iterations)
    u = adaptive_smooth(loop_argmin(cost, offsets), sigma, cfg.smoothing_iterations)
    for gamma in cfg.gammas:
        v = loop_argmin(cost, offsets, u, gamma)
        u = adaptive_smooth(v, sigma, cfg.smoothing_iterations)
    return u


class TestOffsetArgmin:
    def test_hard_against_loops(self):
        cost = torch.rand(2, 27, 3, 4, 2, dtype=torch.float64)
        offsets = search_offsets(1, dtype=torch.float64)
        torch.testing.assert_close(offset_argmin(cost, offsets), loop_argmin(cost, offsets))

    def test_ties_keep_zero_offset(self):
        cost = torch.zeros(1, 27, 2, 2, 2)
        v = offset_argmin(cost, search_offsets(1))
        assert v.abs().max() == 0

    @pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-4])
    def test_soft_tends_to_hard(self, temperature):
        torch.manual_seed(0)
        # distinct costs per voxel, 0.01 apart: the minimum is unique with a known gap
        cost = torch.rand(1, 27, 4, 4, 4).argsort(dim=1).to(torch.float64) * 0.01
        offsets = search_offsets(1, dtype=torch.float64)
        hard = offset_argmin(cost, offsets, "hard")
        soft = offset_argmin(cost, offsets, "soft", temperature)
        # each other offset has weight <= exp(-gap / T) and lies within 2 voxels per axis
        bound = 26 * 2 * torch.exp(torch.tensor(-0.01 / temperature, dtype=torch.float64))
        error = (soft - hard).abs().max()
        assert error <= bound + 1e-12
        if temperature == 1e-2:
            assert error > 1e-3  # the test can tell soft from hard

    def test_soft_gradcheck(self):
        cost = torch.rand(1, 27, 2, 2, 2, dtype=torch.float64, requires_grad=True)
        offsets = search_offsets(1, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda c: offset_argmin(c, offsets, "soft", 0.1), (cost,))

    def test_exceptions(self):
        offsets = search_offsets(1)
        with pytest.raises(ValueError, match="mode"):
            offset_argmin(torch.rand(1, 27, 2, 2, 2), offsets, "median")
        with pytest.raises(ValueError, match="K=27"):
            offset_argmin(torch.rand(1, 8, 2, 2, 2), offsets)


class TestSolveLevel:
    @pytest.mark.parametrize("shape", [(4, 5, 3), (3, 3, 3)])
    def test_against_reference(self, shape):
        torch.manual_seed(1)
        cfg = VoxelOptConfig(gammas=(0.003, 0.1, 1.0))
        f = torch.rand(1, 2, *shape, dtype=torch.float64)
        m = torch.rand_like(f)
        torch.testing.assert_close(solve_level(f, m, cfg).velocity, reference_level(f, m, cfg))

    def test_outputs(self):
        f = torch.rand(2, 3, 6, 5, 4)
        r = solve_level(f, torch.rand_like(f), VoxelOptConfig())
        assert r.velocity.shape == (2, 3, 6, 5, 4)
        assert r.entropy.shape == r.sigma.shape == (2, 1, 6, 5, 4)
        assert r.sigma.min() >= 0.1 - 1e-6 and r.sigma.max() <= 0.5 + 1e-6

    def test_non_adaptive_sigma_constant(self):
        f = torch.rand(1, 3, 6, 5, 4)
        r = solve_level(f, torch.rand_like(f), VoxelOptConfig(adaptive=False, fixed_sigma=0.7))
        assert torch.all(r.sigma == 0.7)

    def test_recovers_unit_shift(self):
        torch.manual_seed(0)
        f = torch.rand(1, 4, 12, 12, 12)
        m = torch.roll(f, shifts=(1, 0, -1), dims=(2, 3, 4))
        u = solve_level(f, m, VoxelOptConfig()).velocity
        inner = u[..., 3:-3, 3:-3, 3:-3]
        expected = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1, 1)
        torch.testing.assert_close(inner, expected.expand_as(inner), atol=0.05, rtol=0)
