"""Tests of voxelopt.baselines.convex_adam (our ConvexAdam)."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch

from voxelopt.baselines.convex_adam import (
    ConvexAdam,
    ConvexAdamConfig,
    box_smooth,
    coupled_convex,
    instance_optimise,
    inverse_consistent,
    rescale_cell_field,
    ssd_cost_volume,
)
from voxelopt.cost import search_offsets
from voxelopt.metrics import dice, mean_over_labels
from voxelopt.phantom import make_phantom
from voxelopt.transform import warp

FAST = dict(adam_iterations=30, ic_iterations=5)


def _translated_pair(shift, shape=(36, 30, 36), spacing=10.0):
    """Phantom ``moving`` and ``fixed(x) = moving(x + shift)`` with their labels."""
    hu, lab = make_phantom(shape, spacing, seed=3)
    moving = torch.from_numpy(hu)[None, None]
    moving_lab = torch.from_numpy(lab)[None, None]
    u = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    u = u.contiguous()
    return (
        warp(moving, u, padding_mode="border"),
        warp(moving_lab, u, "nearest"),
        moving,
        (moving_lab),
        u,
    )


def _mean_dice(a, b) -> float:
    return mean_over_labels(dice(a[0, 0].numpy(), b[0, 0].numpy()))


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(grid_spacing=0), "grid_spacing"),
        (dict(search_radius=1.5), "search_radius"),
        (dict(adam_iterations=-1), "adam_iterations"),
        (dict(smoothing_kernel=4), "smoothing_kernel"),
        (dict(coupling=(0.1, -1.0)), "coupling"),
        (dict(adam_lr=0.0), "adam_lr"),
        (dict(window_low=800.0, window_high=-500.0), "window_low"),
        (dict(nonsense=1), "unknown"),
    ],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        ConvexAdamConfig().replace(**changes)


def test_config_defaults_are_published_and_roundtrip():
    c = ConvexAdamConfig()
    assert (c.grid_spacing, c.search_radius, c.adam_grid_spacing) == (6, 4, 2)
    assert (c.adam_iterations, c.diffusion_weight, c.mind_radius, c.mind_dilation) == (
        80,
        1.25,
        1,
        2,
    )
    assert ConvexAdamConfig(**c.to_dict()) == c
    assert ConvexAdam(grid_spacing=4).config.grid_spacing == 4
    with pytest.raises(TypeError, match="config"):
        ConvexAdam(config={"grid_spacing": 4})


# ------------------------------------------------------------------------------- cost volume
def _loop_ssd(fixed: np.ndarray, moving: np.ndarray, r: int) -> np.ndarray:
    b, c, d, h, w = fixed.shape
    out = np.zeros((b, (2 * r + 1) ** 3, d, h, w))
    offsets = search_offsets(r).long().tolist()  # the channel order of the cost volume
    for k, (a0, a1, a2) in enumerate(offsets):
        for z, y, x in itertools.product(range(d), range(h), range(w)):
            zz, yy, xx = (
                min(max(z + a0, 0), d - 1),
                min(max(y + a1, 0), h - 1),
                min(max(x + a2, 0), w - 1),
            )
            out[:, k, z, y, x] = ((fixed[:, :, z, y, x] - moving[:, :, zz, yy, xx]) ** 2).sum(1)
    return out


@pytest.mark.parametrize("radius", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3), (1, 1, 3, 3, 3)])
def test_cost_volume_matches_loop_reference(radius, shape):
    g = torch.Generator().manual_seed(radius)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64)
    moving = torch.rand(shape, generator=g, dtype=torch.float64)
    cost = ssd_cost_volume(fixed, moving, radius)
    assert cost.shape == (shape[0], (2 * radius + 1) ** 3, *shape[2:])
    np.testing.assert_allclose(cost.numpy(), _loop_ssd(fixed.numpy(), moving.numpy(), radius))


def test_cost_volume_finds_a_shift_and_rejects_bad_input(device):
    moving = torch.rand(1, 4, 9, 9, 9, device=device)
    fixed = torch.roll(moving, shifts=(-1, 2, 0), dims=(2, 3, 4))  # fixed(x) = moving(x + o)
    cost = ssd_cost_volume(fixed, moving, 2)
    best = search_offsets(2, device=device)[cost[..., 3:6, 3:6, 3:6].argmin(1)]
    assert torch.all(best == torch.tensor([1.0, -2.0, 0.0], device=device))
    with pytest.raises(ValueError, match="shapes"):
        ssd_cost_volume(fixed, moving[:, :3], 1)
    with pytest.raises(ValueError, match="radius"):
        ssd_cost_volume(fixed, moving, 0)


# ------------------------------------------------------------------------------- optimisation
def test_coupled_convex_recovers_a_unique_minimum_and_checks_shapes():
    offsets = search_offsets(2)
    target = torch.tensor([1.0, -2.0, 0.0])
    cost = ((offsets - target) ** 2).sum(1).view(1, -1, 1, 1, 1).expand(2, -1, 5, 6, 4)
    cost = cost + 0.01 * torch.rand(cost.shape, generator=torch.Generator().manual_seed(0))
    u = coupled_convex(cost, offsets, (0.003, 0.1, 1.0))
    assert u.shape == (2, 3, 5, 6, 4)
    torch.testing.assert_close(u, target.view(1, 3, 1, 1, 1).expand_as(u))
    with pytest.raises(ValueError, match="offsets"):
        coupled_convex(cost, offsets[:-1], (0.1,))


def test_coupling_smooths_an_outlier():
    offsets = search_offsets(1)
    zero = int(((offsets == 0).all(1)).nonzero())
    cost = torch.ones(1, 27, 7, 7, 7)
    cost[:, zero] = 0.0
    corner = int(((offsets == -1).all(1)).nonzero())
    cost[0, corner, 3, 3, 3] = -0.05  # one voxel slightly prefers offset (-1, -1, -1)
    assert coupled_convex(cost, offsets, ())[0, :, 3, 3, 3].abs().sum() > 0
    u = coupled_convex(cost, offsets, (1.0, 10.0))
    assert u.abs().max() < 0.2


def test_box_smooth_keeps_constants_and_is_differentiable():
    x = torch.full((1, 3, 4, 5, 6), 2.5, dtype=torch.float64)
    torch.testing.assert_close(box_smooth(x, 3), x)
    y = torch.rand(1, 2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_smooth(t, 2), (y,))


def test_inverse_consistency_keeps_an_exact_pair_and_averages_a_biased_one():
    t = torch.tensor([1.5, -0.5, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 6, 7, 8)
    f, b = inverse_consistent(t.clone(), -t.clone(), 5)
    torch.testing.assert_close(f, t)
    torch.testing.assert_close(b, -t)
    f, b = inverse_consistent(t.clone(), torch.zeros_like(t), 1)  # (t - 0) / 2
    torch.testing.assert_close(f, t / 2)


def test_rescale_cell_field_matches_cell_centres():
    coarse = torch.zeros(1, 3, 2, 2, 2)
    coarse[:, 0] = torch.tensor([0.0, 1.0]).view(2, 1, 1)  # linear in axis 0, coarse voxels
    fine = rescale_cell_field(coarse, 6, 2, (6, 6, 6))
    # coarse centres at 2.5 and 8.5 input voxels -> fine centres 0.5, 2.5, ..., 10.5
    fine_centres = torch.arange(6) * 2 + 0.5
    expected = ((fine_centres - 2.5) / 6).clamp(0, 1) * 3  # values in fine voxels (x 6 / 2)
    torch.testing.assert_close(fine[0, 0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="same region"):
        rescale_cell_field(coarse, 6, 2, (5, 6, 6))


def test_instance_optimisation_moves_towards_a_shift():
    g = torch.Generator().manual_seed(0)
    moving = box_smooth(torch.rand(1, 2, 16, 16, 16, generator=g), 3)
    shift = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16)
    fixed = warp(moving, shift.contiguous(), padding_mode="border")
    with torch.no_grad():  # works inside no_grad, as in evaluation
        u = instance_optimise(fixed, moving, torch.zeros(1, 3, 16, 16, 16), 60, 0.2, 0.0, 1)
    centre = u[..., 4:-4, 4:-4, 4:-4].mean((2, 3, 4)).flatten()
    assert torch.allclose(centre, shift[0, :, 0, 0, 0], atol=0.35)


# ------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("shift", [(3.0, -2.0, 1.0), (-5.0, 0.0, 4.0)])
def test_convex_adam_recovers_a_translation(shift):
    fixed, fixed_lab, moving, moving_lab, u_true = _translated_pair(shift)
    model = ConvexAdam(**FAST)
    u = model(fixed, moving)
    assert u.shape == (1, 3, 36, 30, 36) and u.dtype == torch.float32
    inner = u[..., 8:-8, 8:-8, 8:-8].flatten(2).median(-1).values.flatten()
    assert torch.allclose(inner, u_true[0, :, 0, 0, 0], atol=0.75), inner
    before = _mean_dice(moving_lab, fixed_lab)
    after = _mean_dice(warp(moving_lab, u, "nearest"), fixed_lab)
    assert after > before + 0.2 and after > 0.75, (before, after)


def test_discrete_step_alone_captures_a_large_shift():
    # 12 voxels = 2 cells of the coarse grid (spacing 6); the search reaches 4 cells
    fixed, _, moving, _, _ = _translated_pair((12.0, 0.0, 0.0), shape=(48, 48, 48), spacing=8.0)
    u = ConvexAdam(adam_iterations=0, ic_iterations=5)(fixed, moving)
    median = u[0, :, 12:-12, 8:-8, 8:-8].flatten(1).median(1).values
    assert torch.allclose(median, torch.tensor([12.0, 0.0, 0.0]), atol=1.5), median


def test_convex_adam_handles_odd_sizes_batches_and_dtypes():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 13, 9, 7, generator=g, dtype=torch.float64) * 1000 - 400
    u = ConvexAdam(adam_iterations=2, ic_iterations=1, inverse_consistency=True)(img, img)
    assert u.shape == (2, 3, 13, 9, 7) and u.dtype == torch.float64
    assert torch.isfinite(u).all()
    assert u.abs().max() < 1.0  # identical images: (nearly) no motion


@pytest.mark.parametrize(
    "fixed, moving, error, match",
    [
        (torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9), ValueError, "differ"),
        (torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8), ValueError, "fixed_hu"),
        (np.zeros((1, 1, 8, 8, 8)), torch.zeros(1, 1, 8, 8, 8), TypeError, "fixed_hu"),
    ],
)
def test_convex_adam_rejects_bad_input(fixed, moving, error, match):
    with pytest.raises(error, match=match):
        ConvexAdam(**FAST)(fixed, moving)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convex_adam_on_cuda_matches_cpu():
    fixed, _, moving, _, _ = _translated_pair((3.0, -2.0, 1.0))
    model = ConvexAdam(**FAST)
    u_cpu = model(fixed, moving)
    u_gpu = model(fixed.cuda(), moving.cuda()).cpu()
    assert (u_gpu - u_cpu).abs().median() < 0.1


# ------------------------------------------------------------------------------- cross-check
@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(
    importlib.util.find_spec("convexAdam") is None,
    reason="the convexadam package is not installed (pip install --no-deps convexadam)",
)
def test_dice_close_to_the_convexadam_package(ct_dir):
    """Our ConvexAdam and the independent ``convexadam`` package on one real-CT pair."""
    pytest.importorskip("SimpleITK", reason="convexadam imports SimpleITK")
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from voxelopt.data import load_abdomen_ct
    from voxelopt.phantom import make_pair

    ct, lab = load_abdomen_ct(downsample=2)
    pair = make_pair(ct.data, lab.data, 25.0, ct.spacing, seed=1)
    ours = ConvexAdam()(pair.fixed_hu, pair.moving_hu)
    theirs = convex_adam_pt(pair.fixed_hu[0, 0], pair.moving_hu[0, 0], device=torch.device("cpu"))
    theirs = torch.from_numpy(np.asarray(theirs)).float().permute(3, 0, 1, 2)[None]
    scores = {
        name: _mean_dice(warp(pair.moving_labels, u, "nearest"), pair.fixed_labels)
        for name, u in (("ours", ours), ("theirs", theirs))
    }
    initial = _mean_dice(pair.moving_labels, pair.fixed_labels)
    assert scores["ours"] > initial + 0.05, (initial, scores)
    assert abs(scores["ours"] - scores["theirs"]) < 0.05, scores
