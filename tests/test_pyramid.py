"""The multi-level VoxelOpt solver."""

from __future__ import annotations

import pytest
import torch

from voxelopt import VoxelOpt, VoxelOptConfig
from voxelopt.transform import warp


def smooth_features(shape=(24, 24, 24), channels=4, seed=0) -> torch.Tensor:
    """Random features with structure at several scales (so shifts are identifiable)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, *[s // 4 for s in shape], generator=g)
    fine = torch.rand(1, channels, *shape, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return up + 0.3 * fine


class TestVoxelOpt:
    @pytest.mark.filterwarnings("ignore:levels=")
    @pytest.mark.parametrize("levels", [1, 2, 5])
    @pytest.mark.parametrize("shape", [(16, 16, 16), (13, 9, 11)])
    def test_smoke(self, levels, shape, dtype):
        f = torch.rand(1, 2, *shape, dtype=dtype)
        u = VoxelOpt(levels=levels)(f, torch.rand_like(f))
        assert u.shape == (1, 3, *shape) and u.dtype == dtype
        assert torch.isfinite(u).all()

    def test_identical_images_give_zero_field(self):
        f = smooth_features()
        assert VoxelOpt()(f, f).abs().max() < 1e-5

    @pytest.mark.parametrize("shift", [(3, 0, 0), (0, -2, 4), (3, 3, -3)])
    def test_recovers_translation(self, shift):
        """A shift beyond one level's reach (+-1) needs the coarse levels and composition."""
        big = smooth_features((64, 64, 64))
        f = big[..., 8:56, 8:56, 8:56]
        i, j, k = (8 - s for s in shift)
        m = big[..., i : i + 48, j : j + 48, k : k + 48]  # m(x + shift) = f(x)
        u = VoxelOpt(levels=3)(f, m)
        inner = u[..., 8:-8, 8:-8, 8:-8]
        error = (inner - torch.tensor(shift, dtype=u.dtype).view(1, 3, 1, 1, 1)).abs()
        # each level moves in whole voxels of its own grid (coarse voxels are ~2.04 and ~4.27
        # fine voxels here), so the integer search leaves a per-axis quantisation error < 0.5
        assert error.mean() < 0.3
        assert error.quantile(0.99) < 1.0  # hardly any voxel off by a whole search step

    def test_warp_convention(self):
        """warp(moving, u) reproduces the fixed features."""
        f = smooth_features((32, 32, 32))
        m = torch.roll(f, shifts=(2, -1, 0), dims=(2, 3, 4))
        u = VoxelOpt(levels=3)(f, m)
        before = (m - f)[..., 6:-6, 6:-6, 6:-6].abs().mean()
        after = (warp(m, u) - f)[..., 6:-6, 6:-6, 6:-6].abs().mean()
        assert after < 0.2 * before

    @pytest.mark.parametrize("argmin", ["hard", "soft"])
    @pytest.mark.parametrize("sigma_mode", ["reference", "paper"])
    def test_batch_equals_singles(self, argmin, sigma_mode):
        # float64: batched and single matrix products round differently in float32
        f = torch.cat([smooth_features(seed=1), 3.0 * smooth_features(seed=2)]).double()
        m = torch.cat([smooth_features(seed=3), smooth_features(seed=4)]).double()
        solver = VoxelOpt(levels=3, argmin=argmin, sigma_mode=sigma_mode)
        batch = solver(f, m)
        singles = torch.cat([solver(f[i : i + 1], m[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(batch, singles, atol=1e-9, rtol=0)

    def test_soft_tends_to_hard(self):
        f = smooth_features((16, 16, 16)).double()
        m = torch.roll(f, shifts=(1, 2, 0), dims=(2, 3, 4))
        hard = VoxelOpt(levels=3)(f, m)
        errors = [
            (VoxelOpt(levels=3, argmin="soft", temperature=t)(f, m) - hard).abs().mean()
            for t in (1e-2, 1e-3, 1e-5)
        ]
        assert errors[0] > errors[1] > errors[2]
        assert errors[2] < 1e-3

    def test_gradcheck_soft(self):
        torch.manual_seed(0)
        f = torch.rand(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        m = torch.rand(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        solver = VoxelOpt(
            levels=2, argmin="soft", temperature=0.5, gammas=(0.1, 1.0), integration_steps=2
        )
        assert torch.autograd.gradcheck(solver, (f, m), atol=1e-5, fast_mode=True)

    def test_soft_gradients_reach_features(self):
        f = smooth_features((12, 12, 12)).requires_grad_()
        m = torch.roll(f.detach(), 1, dims=2).requires_grad_()
        u = VoxelOpt(levels=2, argmin="soft", temperature=0.05)(f, m)
        u.square().mean().backward()
        assert f.grad.abs().sum() > 0 and m.grad.abs().sum() > 0

    def test_solve_returns_levels(self):
        f = torch.rand(1, 2, 16, 12, 8)
        result = VoxelOpt(levels=3).solve(f, torch.rand_like(f))
        assert [lv.entropy.shape[2:] for lv in result.levels] == [
            (16, 12, 8),
            (8, 6, 4),
            (4, 3, 2),
        ]
        assert result.entropy.shape == (1, 1, 16, 12, 8)
        assert result.sigma.shape == (1, 1, 16, 12, 8)

    def test_bfloat16_features(self):
        f = smooth_features((16, 16, 16))
        m = torch.roll(f, 2, dims=3)
        u32 = VoxelOpt(levels=3)(f, m)
        u16 = VoxelOpt(levels=3)(f.bfloat16(), m.bfloat16())
        assert u16.dtype == torch.float32  # fields stay in float32
        assert (u16 - u32)[..., 4:-4, 4:-4, 4:-4].abs().mean() < 0.2

    def test_precision_option(self):
        f = smooth_features((16, 16, 16))
        m = torch.roll(f, 2, dims=3)
        result = VoxelOpt(levels=3, precision="bfloat16").solve(f, m)
        assert result.levels[0].entropy.dtype == torch.bfloat16  # the cost volume's dtype
        assert result.displacement.dtype == torch.float32
        u32 = VoxelOpt(levels=3, precision="float32")(f.double(), m.double())
        assert u32.dtype == torch.float32

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_cuda_matches_cpu(self, dtype):
        f = smooth_features((24, 24, 24))
        m = torch.roll(f, 3, dims=2)
        cpu = VoxelOpt()(f, m)
        gpu = VoxelOpt()(f.cuda().to(dtype), m.cuda().to(dtype)).cpu()
        assert (gpu - cpu)[..., 6:-6, 6:-6, 6:-6].abs().mean() < 0.1

    @pytest.mark.parametrize(
        "fixed, moving, match",
        [
            (torch.rand(1, 2, 8, 8, 8), torch.rand(1, 2, 8, 8, 9), "differ in shape"),
            (torch.rand(2, 8, 8, 8), torch.rand(2, 8, 8, 8), r"\(B, C, D, H, W\)"),
            (torch.full((1, 1, 4, 4, 4), float("nan")), torch.rand(1, 1, 4, 4, 4), "NaN"),
            (torch.ones(1, 1, 4, 4, 4, dtype=torch.long), torch.rand(1, 1, 4, 4, 4), "floating"),
        ],
    )
    def test_exceptions(self, fixed, moving, match):
        with pytest.raises(ValueError, match=match):
            VoxelOpt()(fixed, moving)

    @pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
    def test_single_non_finite_voxel(self, bad):
        moving = torch.rand(1, 2, 4, 4, 4)
        moving[0, 1, 2, 3, 1] = bad
        with pytest.raises(ValueError, match="moving features contain NaN or Inf"):
            VoxelOpt(levels=1)(torch.rand(1, 2, 4, 4, 4), moving)

    def test_huge_finite_features_accepted(self):
        # their sum overflows to Inf; the check must still see that every voxel is finite
        f = torch.full((1, 1, 4, 4, 4), 3e38)
        assert torch.isinf(f.sum())
        assert torch.isfinite(VoxelOpt(levels=1)(f, f)).all()

    def test_too_many_levels_warns(self):
        f = torch.rand(1, 1, 16, 14, 18)
        with pytest.warns(UserWarning, match=r"coarsest level \(2, 2, 3\).*levels <= 2"):
            VoxelOpt(levels=4)(f, f)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="fixed"):
            VoxelOpt()([1, 2], torch.rand(1, 1, 4, 4, 4))


class TestConfig:
    @pytest.mark.parametrize(
        "field, value",
        [
            ("levels", 0),
            ("kernel_size", 0),
            ("beta", 0.0),
            ("sigma_low", 0.0),
            ("sigma_high", 0.05),
            ("argmin", "median"),
            ("sigma_mode", "other"),
            ("integration_steps", -1),
            ("gammas", (0.1, -1.0)),
            ("temperature", -1.0),
            ("precision", "int8"),
        ],
    )
    def test_invalid_values(self, field, value):
        with pytest.raises(ValueError, match=field.split("_")[0]):
            VoxelOptConfig(**{field: value})

    def test_unknown_override(self):
        with pytest.raises(ValueError, match="unknown"):
            VoxelOpt(levles=3)

    def test_defaults_are_the_reference(self):
        c = VoxelOptConfig()
        assert (c.levels, c.kernel_size, c.beta, c.sigma_low, c.sigma_high) == (5, 1, 0.1, 0.1, 0.5)
        assert c.gammas == (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
        assert (c.integration_steps, c.smoothing_iterations, c.argmin) == (7, 3, "hard")

    def test_round_trip_dict(self):
        c = VoxelOptConfig(levels=3, gammas=[0.1])
        assert VoxelOptConfig(**c.to_dict()) == c
