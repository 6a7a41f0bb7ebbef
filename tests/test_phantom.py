"""Tests of voxelopt.phantom: the phantom, random smooth fields and synthetic pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxelopt.data import load_abdomen_ct
from voxelopt.metrics import dice, jacobian_determinant
from voxelopt.paths import ENV_VAR
from voxelopt.phantom import (
    make_pair,
    make_phantom,
    random_smooth_displacement,
)
from voxelopt.transform import warp

SMALL = dict(shape=(24, 20, 28), spacing=12.0)  # the whole body at a coarse resolution


# ---------------------------------------------------------------------------------- phantom
def test_phantom_default_has_all_organs():
    hu, labels = make_phantom()
    assert hu.shape == labels.shape == (96, 80, 112)
    assert hu.dtype == np.float32 and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(14))
    assert hu[0, 0, 0] == -1000.0  # air in the corner
    median = {lab: float(np.median(hu[labels == lab])) for lab in (1, 2, 6, 8)}
    assert abs(median[6] - 60) < 10 and abs(median[1] - 50) < 10  # liver, spleen
    assert abs(median[2] - 150) < 10 and abs(median[8] - 200) < 10  # kidney, aorta
    assert hu.max() > 600  # spine
    # RAS+: the liver lies on the patient's right (high axis-0 index), the spleen on the left
    centre = (hu.shape[0] - 1) / 2
    assert np.argwhere(labels == 6)[:, 0].mean() > centre
    assert np.argwhere(labels == 1)[:, 0].mean() < centre
    # anterior: gallbladder ahead of the aorta (axis 1); esophagus above the kidneys (axis 2)
    assert np.argwhere(labels == 4)[:, 1].mean() > np.argwhere(labels == 8)[:, 1].mean()
    assert np.argwhere(labels == 5)[:, 2].mean() > np.argwhere(labels == 2)[:, 2].mean()


def test_phantom_deterministic_by_seed():
    a = make_phantom(**SMALL, seed=3)
    b = make_phantom(**SMALL, seed=3)
    c = make_phantom(**SMALL, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_phantom_anatomy_fixed_in_mm():
    """Halving the resolution keeps organ volumes in mm^3 (within discretisation)."""
    _, fine = make_phantom((48, 40, 56), 6.0)
    _, coarse = make_phantom((24, 20, 28), 12.0)
    for lab in (1, 6, 7):
        v_fine = (fine == lab).sum() * 6.0**3
        v_coarse = (coarse == lab).sum() * 12.0**3
        assert v_coarse == pytest.approx(v_fine, rel=0.25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(8, 8)), "shape"),
        (dict(shape=(8, 8, 1)), "shape"),
        (dict(spacing=0.0), "spacing"),
        (dict(spacing=(1.0, 2.0)), "spacing"),
    ],
)
def test_phantom_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_phantom(**kwargs)


# ----------------------------------------------------------------------------- random field
@pytest.mark.parametrize("diffeomorphic", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_random_field_shape_and_magnitude(diffeomorphic, batch):
    u = random_smooth_displacement(
        (12, 10, 14), 3.0, control_spacing=5, seed=1, batch=batch, diffeomorphic=diffeomorphic
    )
    assert u.shape == (batch, 3, 12, 10, 14) and u.dtype == torch.float32
    peak = u.norm(dim=1).flatten(1).amax(1)
    tol = 0.01 if diffeomorphic else 1e-5
    assert torch.allclose(peak, torch.full_like(peak, 3.0), rtol=tol)
    if batch == 2:
        assert not torch.allclose(u[0], u[1])


def test_random_field_diffeomorphic_does_not_fold():
    u = random_smooth_displacement((16, 16, 16), 6.0, control_spacing=4, diffeomorphic=True)
    assert jacobian_determinant(u).min() > 0
    v = random_smooth_displacement((16, 16, 16), 6.0, control_spacing=4, diffeomorphic=False)
    assert jacobian_determinant(v).min() <= 0  # the same amplitude folds without integration


def test_random_field_is_smooth():
    """Trilinear control grid: neighbour differences bounded by the control-cell slope."""
    u = random_smooth_displacement((20, 20, 20), 4.0, control_spacing=5, seed=2)
    step = (u[:, :, 1:] - u[:, :, :-1]).abs().max()
    assert step < 4.0 * 2 / 5 * 1.01  # two control values of size <= 4, 5 voxels apart
    noise = torch.randn(1, 3, 20, 20, 20)
    assert step < (noise[:, :, 1:] - noise[:, :, :-1]).abs().max()


def test_random_field_seed_generator_and_zero():
    a = random_smooth_displacement((8, 8, 8), 2.0, seed=5)
    b = random_smooth_displacement((8, 8, 8), 2.0, seed=5)
    c = random_smooth_displacement((8, 8, 8), 2.0, seed=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, random_smooth_displacement((8, 8, 8), 2.0, seed=6))
    zero = random_smooth_displacement((8, 8, 8), 0.0, dtype=torch.float64)
    assert zero.dtype == torch.float64 and torch.count_nonzero(zero) == 0


def test_random_field_spacing_in_mm():
    u = random_smooth_displacement((10, 10, 10), 6.0, spacing=(1.0, 2.0, 3.0), seed=0)
    mm = u * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1)
    assert mm.norm(dim=1).max().item() == pytest.approx(6.0, rel=1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        (((8, 8, 8), -1.0), "max_displacement"),
        (((8, 8), 1.0), "shape"),
    ],
)
def test_random_field_errors(args, match):
    with pytest.raises(ValueError, match=match):
        random_smooth_displacement(*args)
    with pytest.raises(ValueError, match="control_spacing"):
        random_smooth_displacement((8, 8, 8), 1.0, control_spacing=0)
    with pytest.raises(ValueError, match="batch"):
        random_smooth_displacement((8, 8, 8), 1.0, batch=0)


# ------------------------------------------------------------------------------------- pair
@pytest.fixture(scope="module")
def small_phantom():
    return make_phantom(**SMALL)


def test_pair_true_field_recovers_fixed(small_phantom):
    hu, labels = small_phantom
    pair = make_pair(hu, labels, 24.0, 12.0, seed=1, intensity_change=False)
    assert pair.fixed_hu.shape == (1, 1, 24, 20, 28) and pair.true_disp.shape[1] == 3
    assert pair.fixed_labels.dtype == torch.int64
    peak_mm = (pair.true_disp.norm(dim=1).max() * 12.0).item()
    assert peak_mm == pytest.approx(24.0, rel=0.01)
    moved_labels = warp(pair.moving_labels, pair.true_disp, mode="nearest", padding_mode="border")
    assert all(v == 1.0 for v in dice(moved_labels, pair.fixed_labels).values())
    moved = warp(pair.moving_hu, pair.true_disp, padding_mode="border")
    assert torch.allclose(moved, pair.fixed_hu)
    # the deformation is not trivial: without it the labels do not overlap perfectly
    before = dice(pair.moving_labels, pair.fixed_labels)
    assert min(before.values()) < 0.9


def test_pair_zero_deformation_identical(small_phantom):
    hu, labels = small_phantom
    pair = make_pair(hu, labels, 0.0, 12.0, intensity_change=False)
    assert torch.equal(pair.fixed_hu, pair.moving_hu)
    assert torch.equal(pair.fixed_labels, pair.moving_labels)
    assert torch.equal(pair.moving_hu[0, 0], torch.from_numpy(hu))


def test_pair_seed_and_intensity_change(small_phantom):
    hu, labels = small_phantom
    a = make_pair(hu, labels, 20.0, 12.0, seed=2)
    b = make_pair(torch.from_numpy(hu), torch.from_numpy(labels), 20.0, 12.0, seed=2)
    c = make_pair(hu, labels, 20.0, 12.0, seed=3)
    assert torch.equal(a.fixed_hu, b.fixed_hu) and torch.equal(a.moving_hu, b.moving_hu)
    assert not torch.equal(a.true_disp, c.true_disp)
    change = a.moving_hu[0, 0] - torch.from_numpy(hu)
    assert 0 < change.abs().mean() < 30 + 3 * 10
    assert change.std() > 5  # the noise is there


def test_pair_errors(small_phantom):
    hu, labels = small_phantom
    with pytest.raises(ValueError, match="differ in shape"):
        make_pair(hu, labels[:-1], 5.0, 12.0)
    with pytest.raises(ValueError, match="D, H, W"):
        make_pair(hu[0], labels[0], 5.0, 12.0)
    with pytest.raises(ValueError, match="spacing"):
        make_pair(hu, labels, 5.0, 0.0)


# ---------------------------------------------------------------------------------- real CT
def test_load_abdomen_ct(ct_dir):
    ct, lab = load_abdomen_ct()
    assert ct.shape == lab.shape == (122, 101, 112)
    assert ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert set(np.unique(lab.data)) == set(range(14)) - {5}  # no esophagus in this scan
    half, half_lab = load_abdomen_ct(downsample=2)
    assert half.shape == half_lab.shape == (61, 51, 56)
    assert half.spacing == pytest.approx((6.0, 6.0, 6.0))
    assert np.allclose(half.affine[:3, 3], ct.affine[:3, 3])
    assert np.array_equal(half_lab.data, lab.data[::2, ::2, ::2])


def test_load_abdomen_ct_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_abdomen_ct()
    with pytest.raises(ValueError, match="downsample"):
        load_abdomen_ct(downsample=0)
