"""Tests of voxelopt.baselines.voxelmorph (VoxelMorph-style U-Net + scaling and squaring)."""

from __future__ import annotations

import pytest
import torch

from voxelopt.baselines.voxelmorph import UNet3d, VoxelMorph
from voxelopt.transform import integrate_velocity, warp

TINY = dict(encoder=(4, 4), decoder=(4, 4, 4))


def _pair(shape, batch=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(batch, 1, *shape, generator=g, dtype=dtype) * 1200 - 450
    moving = torch.rand(batch, 1, *shape, generator=g, dtype=dtype) * 1200 - 450
    return fixed, moving


@pytest.mark.parametrize("shape", [(16, 16, 16), (13, 9, 18), (5, 6, 7)])
@pytest.mark.parametrize("int_downsize", [1, 2])
def test_shapes_for_any_size(shape, int_downsize):
    model = VoxelMorph(int_downsize=int_downsize, **TINY)
    fixed, moving = _pair(shape, batch=2)
    assert model.velocity(fixed, moving).shape == (2, 3, *shape)
    assert model(fixed, moving).shape == (2, 3, *shape)


def test_default_unet_matches_voxelmorph_channels():
    net = UNet3d()
    assert net.depth == 4 and net.out_channels == 16
    out = net(torch.rand(1, 2, 16, 16, 16))
    assert out.shape == (1, 16, 16, 16, 16)


def test_zero_init_is_the_identity(dtype):
    model = VoxelMorph(init_std=0.0, **TINY).to(dtype)
    fixed, moving = _pair((8, 10, 12), dtype=dtype)
    u = model(fixed, moving)
    assert u.dtype == dtype
    assert torch.equal(u, torch.zeros_like(u))
    # default init: VoxelMorph's N(0, 1e-5) flow head, almost the identity but not exactly
    u = VoxelMorph(**TINY).to(dtype)(fixed, moving)
    assert 0 < u.abs().max() < 1e-3


def test_gradients_reach_every_layer():
    torch.manual_seed(0)
    model = VoxelMorph(init_std=1e-2, **TINY)
    fixed, moving = _pair((8, 8, 8))
    u = model(fixed, moving)
    loss = (warp(moving / 1000, u) - fixed / 1000).pow(2).mean() + u.pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_output_is_the_integrated_velocity():
    torch.manual_seed(1)
    model = VoxelMorph(init_std=0.05, int_downsize=1, integration_steps=5, **TINY)
    fixed, moving = _pair((8, 8, 8))
    v = model.velocity(fixed, moving)
    torch.testing.assert_close(model(fixed, moving), integrate_velocity(v, 5))
    plain = VoxelMorph(init_std=0.05, integration_steps=0, **TINY)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(fixed, moving), v)


def test_gradcheck_float64_with_respect_to_the_moving_image():
    torch.manual_seed(2)
    model = VoxelMorph(init_std=0.1, int_downsize=1, integration_steps=2, **TINY).double()
    fixed, moving = _pair((4, 4, 4), dtype=torch.float64)
    moving = moving.clamp(-400, 700).requires_grad_(True)  # inside the window: smooth
    assert torch.autograd.gradcheck(lambda m: model(fixed, m), (moving,), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(integration_steps=-1), "integration_steps"),
        (dict(int_downsize=0), "int_downsize"),
        (dict(init_std=-1.0), "init_std"),
        (dict(window_low=1.0, window_high=0.0), "window_low"),
        (dict(encoder=(), decoder=(4,)), "encoder"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VoxelMorph(**kwargs)


def test_bad_input():
    model = VoxelMorph(**TINY)
    with pytest.raises(ValueError, match="differ"):
        model(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="moving_hu"):
        model(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8))


def test_runs_on_device(device):
    model = VoxelMorph(**TINY).to(device)
    fixed, moving = _pair((8, 8, 8))
    assert model(fixed.to(device), moving.to(device)).device.type == device.type
