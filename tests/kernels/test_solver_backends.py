"""The whole solver on the numba kernels against the torch path, and the progress callback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed")

from voxelopt import VoxelOpt, kernels  # noqa: E402
from voxelopt.ct import body_mask  # noqa: E402
from voxelopt.entropy import displacement_entropy, sigma_map  # noqa: E402
from voxelopt.features import build_extractor  # noqa: E402
from voxelopt.filtering import side_weight  # noqa: E402
from voxelopt.metrics.overlap import dice  # noqa: E402
from voxelopt.phantom import make_pair, make_phantom  # noqa: E402
from voxelopt.transform import warp  # noqa: E402

LEVELS = 4  # coarsest level 8 x 7 x 9 voxels


@pytest.fixture(scope="module")
def phantom_case():
    """A 64 x 56 x 72 phantom pair at 4.5 mm (15 mm true displacement), MIND features, and
    the torch path's solution."""
    hu, labels = make_phantom((64, 56, 72), 4.5, seed=0)
    pair = make_pair(hu, labels, 15.0, 4.5, seed=1)
    extractor = build_extractor("mind")
    with torch.inference_mode():
        fixed, moving = extractor(pair.fixed_hu), extractor(pair.moving_hu)
        reference = VoxelOpt(levels=LEVELS, backend="torch").solve(fixed, moving)
    return pair, fixed, moving, reference


def _mean_dice(pair, disp) -> float:
    moved = warp(pair.moving_labels, disp, mode="nearest")
    return float(np.mean(list(dice(moved[0, 0].numpy(), pair.fixed_labels[0, 0].numpy()).values())))


def test_phantom_numba_equals_torch(phantom_case):
    pair, fixed, moving, reference = phantom_case
    with torch.inference_mode():
        result = VoxelOpt(levels=LEVELS, backend="numba").solve(fixed, moving)
    assert _mean_dice(pair, result.displacement) == pytest.approx(
        _mean_dice(pair, reference.displacement), abs=1e-3
    )
    assert _mean_dice(pair, result.displacement) > _mean_dice(
        pair, torch.zeros_like(result.displacement)
    )
    body = body_mask(pair.fixed_hu)[0, 0]
    diff = (result.displacement - reference.displacement).abs().amax(1)[0][body]
    # Float rounding: the entropy's exp and log round differently from torch's (a few ulps),
    # which decides a few near-tied argmins; everything else is bit for bit (next test).
    assert diff.median() <= 1e-5
    assert diff.quantile(0.99) <= 1e-3
    assert (diff > 0.01).float().mean() <= 0.01
    assert (result.entropy - reference.entropy).abs().median() <= 1e-5


def test_phantom_bit_for_bit_with_torch_entropy(phantom_case, monkeypatch):
    """With the entropy and sigma of torch, every other kernel reproduces the torch path
    exactly, through all levels, warps, squarings and compositions."""
    _, fixed, moving, reference = phantom_case

    def torch_sigma(entropy, mode, low, high, alpha):
        sigma = sigma_map(entropy, mode, low, high, alpha)
        return sigma, side_weight(sigma)

    def torch_entropy(fixed, moving, kernel_size, beta, prob_floor):
        cost = kernels.cost_volume(fixed, moving, kernel_size)
        return cost, displacement_entropy(cost, beta, prob_floor)

    monkeypatch.setattr(kernels, "cost_and_entropy", torch_entropy)
    monkeypatch.setattr(kernels, "sigma_and_weight", torch_sigma)
    with torch.inference_mode():
        result = VoxelOpt(levels=LEVELS, backend="numba").solve(fixed, moving)
    assert torch.equal(result.displacement, reference.displacement)
    for ours, theirs in zip(result.levels, reference.levels, strict=True):
        assert torch.equal(ours.velocity, theirs.velocity)


@pytest.mark.parametrize(
    "adaptive, sigma_mode", [(True, "reference"), (True, "paper"), (False, "reference")]
)
def test_batch_of_two_and_options(adaptive, sigma_mode):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2, 3, 14, 11, 17, generator=g)
    m = torch.roll(f, shifts=(1, -1, 2), dims=(2, 3, 4))
    options = dict(levels=2, adaptive=adaptive, sigma_mode=sigma_mode)
    with torch.inference_mode():
        ours = VoxelOpt(backend="numba", **options)(f, m)
        theirs = VoxelOpt(backend="torch", **options)(f, m)
        singles = torch.cat(
            [VoxelOpt(backend="numba", **options)(f[i : i + 1], m[i : i + 1]) for i in range(2)]
        )
    assert torch.equal(ours, singles)
    inner = (ours - theirs)[..., 3:-3, 3:-3, 3:-3].abs()
    assert inner.median() <= 1e-5 and inner.mean() <= 1e-2


class TestProgressCallback:
    @pytest.mark.parametrize("backend", ["torch", "auto"])
    def test_called_after_each_level(self, backend):
        calls = []
        f = torch.rand(1, 2, 20, 20, 20)
        VoxelOpt(levels=3, backend=backend)(
            f, torch.rand_like(f), on_level=lambda *a: calls.append(a)
        )
        assert calls == [(1, 3), (2, 3), (3, 3)]

    def test_solve_and_order(self):
        seen = []
        f = torch.rand(1, 2, 16, 12, 20)
        solver = VoxelOpt(levels=2)
        result = solver.solve(f, f, on_level=lambda done, total: seen.append(done / total))
        assert seen == [0.5, 1.0] and result.displacement.shape == (1, 3, 16, 12, 20)

    def test_not_callable(self):
        f = torch.rand(1, 2, 8, 8, 8)
        with pytest.raises(TypeError, match="on_level"):
            VoxelOpt(levels=1)(f, f, on_level=3)
