"""Tests of voxelopt.io on synthetic NIfTI files with non-RAS (LPS, permuted) orientations."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine
from scipy import ndimage

from voxelopt.io import (
    Volume,
    atomic_output,
    check_same_grid,
    displacement_from_file_grid,
    displacement_to_file_grid,
    load_labels,
    load_volume,
    resample_to,
    save_volume,
)

# file axis 0 runs posterior (2 mm), axis 1 superior (1.5 mm), axis 2 left (3 mm)
PERMUTED = np.array(
    [
        [0.0, 0.0, -3.0, 40.0],
        [-2.0, 0.0, 0.0, 10.0],
        [0.0, 1.5, 0.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
LPS = np.diag([-2.0, -2.5, 3.0, 1.0])
LPS[:3, 3] = (30.0, 25.0, -10.0)
RAS = np.diag([2.0, 2.0, 2.0, 1.0])

AFFINES = {"ras": RAS, "lps": LPS, "permuted": PERMUTED}


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("name", list(AFFINES))
def test_load_reorients_to_ras(tmp_path, rng, name):
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = AFFINES[name]
    vol = load_volume(_write(tmp_path / "img.nii.gz", data, affine))
    assert vol.data.dtype == np.float32
    assert min(vol.data.strides) > 0  # torch.from_numpy takes it (a flipped view would not)
    torch.from_numpy(vol.data)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert np.all(np.diag(vol.affine)[:3] > 0)
    assert vol.file_shape == data.shape
    assert np.allclose(vol.file_affine, affine)
    assert sorted(vol.spacing) == sorted(np.linalg.norm(affine[:3, :3], axis=0))
    # every canonical voxel holds the value of the file voxel at the same world position
    idx = np.indices(vol.shape).reshape(3, -1).T
    world = apply_affine(vol.affine, idx)
    file_idx = np.rint(apply_affine(np.linalg.inv(affine), world)).astype(int)
    expected = data[file_idx[:, 0], file_idx[:, 1], file_idx[:, 2]]
    assert np.array_equal(vol.data.reshape(-1), expected)


@pytest.mark.parametrize("name", list(AFFINES))
def test_save_round_trip_in_file_orientation(tmp_path, rng, name):
    data = rng.integers(0, 9, size=(5, 6, 7)).astype(np.int16)
    src = _write(tmp_path / "in.nii.gz", data, AFFINES[name])
    vol = load_labels(src)
    assert vol.data.dtype == np.int64 and min(vol.data.strides) > 0
    out = save_volume(vol.data, vol, tmp_path / "out.nii.gz", dtype=np.int16)
    img = nib.load(str(out))
    assert np.array_equal(np.asarray(img.dataobj), data)
    assert np.allclose(img.affine, AFFINES[name], atol=1e-5)
    assert img.get_data_dtype() == np.int16
    # torch input and default dtype
    back = save_volume(torch.from_numpy(vol.data.astype(np.float64)), vol, tmp_path / "f.nii")
    assert nib.load(str(back)).get_data_dtype() == np.float32


def test_save_errors(tmp_path, rng):
    vol = load_volume(_write(tmp_path / "a.nii.gz", rng.normal(size=(4, 5, 6)), LPS))
    with pytest.raises(ValueError, match="does not match"):
        save_volume(np.zeros((4, 5, 5)), vol, tmp_path / "b.nii.gz")
    with pytest.raises(FileNotFoundError, match="folder"):
        save_volume(vol.data, vol, tmp_path / "missing" / "b.nii.gz")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        load_volume(bad)
    flat = _write(tmp_path / "flat.nii", np.zeros((4, 5), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="3D"):
        load_volume(flat)
    four = _write(tmp_path / "four.nii", np.zeros((4, 5, 6, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="3D"):
        load_volume(four)
    nan = np.zeros((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="nan.nii.gz.*NaN"):
        load_volume(_write(tmp_path / "nan.nii.gz", nan, np.eye(4)))
    inf = np.zeros((4, 5, 6), np.float32)
    inf[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="Inf"):
        load_volume(_write(tmp_path / "inf.nii.gz", inf, np.eye(4)))
    frac = _write(tmp_path / "frac.nii.gz", np.full((4, 5, 6), 0.5, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="label map"):
        load_labels(frac)


def test_load_applies_scaling(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), RAS)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    vol = load_volume(tmp_path / "scaled.nii.gz")
    assert np.array_equal(vol.data, np.arange(24).reshape(2, 3, 4) * 2.0 - 1024.0)


def test_load_squeezes_singleton_4d(tmp_path, rng):
    data = rng.normal(size=(4, 5, 6, 1)).astype(np.float32)
    vol = load_volume(_write(tmp_path / "s.nii.gz", data, RAS))
    assert vol.shape == (4, 5, 6)
    assert np.array_equal(vol.data, data[..., 0])


# -------------------------------------------------------------------------- displacements
@pytest.mark.parametrize("name", list(AFFINES))
def test_translation_to_file_axes(tmp_path, name):
    vol = load_volume(_write(tmp_path / "a.nii.gz", np.zeros((5, 6, 7), np.float32), AFFINES[name]))
    t = np.array([1.0, -2.0, 0.5])
    disp = np.broadcast_to(t.reshape(3, 1, 1, 1), (3, *vol.shape)).copy()
    out = displacement_to_file_grid(disp, vol)
    assert out.shape == (5, 6, 7, 3) and out.dtype == np.float32
    d_file = out[0, 0, 0]
    assert np.allclose(out, d_file)  # still a translation
    # the same physical (world, mm) displacement
    assert np.allclose(vol.affine[:3, :3] @ t, AFFINES[name][:3, :3] @ d_file)


def test_translation_permuted_explicit(tmp_path):
    vol = load_volume(_write(tmp_path / "a.nii.gz", np.zeros((5, 6, 7), np.float32), PERMUTED))
    disp = np.zeros((3, *vol.shape), np.float32)
    disp[0], disp[1], disp[2] = 1.0, 2.0, 3.0  # right, anterior, superior (canonical voxels)
    # file axis 0 = posterior -> -2, axis 1 = superior -> +3, axis 2 = left -> -1
    assert np.allclose(displacement_to_file_grid(disp, vol)[0, 0, 0], [-2.0, 3.0, -1.0])


@pytest.mark.parametrize("name", list(AFFINES))
def test_displacement_field_maps_same_points(tmp_path, rng, name):
    """Per voxel: x + u(x) in canonical voxels and in file voxels name the same world point."""
    affine = AFFINES[name]
    vol = load_volume(_write(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32), affine))
    disp = rng.normal(size=(3, *vol.shape)).astype(np.float32)
    out = displacement_to_file_grid(torch.from_numpy(disp)[None], vol)
    idx_c = np.indices(vol.shape).reshape(3, -1).T
    target_world = apply_affine(vol.affine, idx_c + disp.reshape(3, -1).T)
    idx_f = np.rint(apply_affine(np.linalg.inv(affine), apply_affine(vol.affine, idx_c)))
    idx_f = idx_f.astype(int)
    d_f = out[idx_f[:, 0], idx_f[:, 1], idx_f[:, 2]]
    assert np.allclose(apply_affine(affine, idx_f + d_f), target_world, atol=1e-4)
    back = displacement_from_file_grid(out, vol)
    assert np.allclose(back, disp, atol=1e-6)


def test_displacement_errors(tmp_path):
    vol = load_volume(_write(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32), PERMUTED))
    with pytest.raises(ValueError, match="disp"):
        displacement_to_file_grid(np.zeros((3, 4, 5, 5)), vol)
    with pytest.raises(ValueError, match="disp_file"):
        displacement_from_file_grid(np.zeros((*vol.shape, 3)), vol)  # canonical, not file


# ------------------------------------------------------------------------------- resampling
def _shifted_grid(tmp_path, shape, affine, name="ref.nii.gz"):
    return load_volume(_write(tmp_path / name, np.zeros(shape, np.float32), affine))


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("src_name", ["lps", "permuted"])
def test_resample_matches_map_coordinates(tmp_path, rng, order, src_name):
    src_affine = AFFINES[src_name]
    src_data = rng.normal(size=(8, 9, 10)).astype(np.float32)
    if order == 0:
        src_data = rng.integers(0, 5, size=(8, 9, 10)).astype(np.float32)
    src = load_volume(_write(tmp_path / "src.nii.gz", src_data, src_affine))
    ref_affine = np.diag([1.7, 2.1, 2.4, 1.0])
    ref_affine[:3, 3] = apply_affine(src_affine, (3.1, 4.2, 5.3))  # overlapping fields of view
    ref = _shifted_grid(tmp_path, (7, 6, 8), ref_affine)
    got = resample_to(src, ref, order=order, fill_value=-7.0)
    assert got.shape == ref.shape and np.array_equal(got.affine, ref.affine)
    # independent: sample the source FILE array at the file voxel of each world point
    idx = np.indices(ref.shape).reshape(3, -1)
    world = apply_affine(ref.affine, idx.T)
    coords = apply_affine(np.linalg.inv(src_affine), world).T
    expected = ndimage.map_coordinates(
        src_data.astype(np.float64), coords, order=order, mode="constant", cval=-7.0
    ).reshape(ref.shape)
    assert np.allclose(got.data, expected, atol=1e-5)
    assert (got.data == -7.0).any() and (got.data != -7.0).any()


def test_resample_linear_function_exact(tmp_path):
    """Trilinear interpolation reproduces a linear function of world position."""
    src = _shifted_grid(tmp_path, (10, 10, 10), PERMUTED, "src.nii.gz")
    world = apply_affine(src.affine, np.indices(src.shape).reshape(3, -1).T)
    a = np.array([0.5, -1.0, 2.0])
    src = src.with_data((world @ a + 3.0).reshape(src.shape).astype(np.float32))
    ref_affine = np.diag([1.3, 1.1, 0.9, 1.0])
    ref_affine[:3, 3] = world.min(0) + 1.0
    ref = _shifted_grid(tmp_path, (6, 6, 6), ref_affine)
    got = resample_to(src, ref)
    ref_world = apply_affine(ref.affine, np.indices(ref.shape).reshape(3, -1).T)
    assert np.allclose(got.data.reshape(-1), ref_world @ a + 3.0, atol=1e-3)


def test_resample_labels_and_same_grid(tmp_path, rng):
    labels = load_labels(
        _write(tmp_path / "l.nii.gz", rng.integers(0, 4, size=(6, 6, 6)).astype(np.uint8), LPS)
    )
    same = resample_to(labels, labels, order=0)
    assert np.array_equal(same.data, labels.data) and same.data is not labels.data
    ref = _shifted_grid(tmp_path, (5, 5, 5), np.diag([1.0, 1.0, 1.0, 1.0]) @ LPS)
    moved = resample_to(labels, ref, order=0)
    assert moved.data.dtype == np.int64
    assert set(np.unique(moved.data)) <= set(np.unique(labels.data))
    with pytest.raises(ValueError, match="order"):
        resample_to(labels, ref, order=3)


def test_check_same_grid(tmp_path):
    a = _shifted_grid(tmp_path, (4, 5, 6), LPS, "a.nii.gz")
    b = _shifted_grid(tmp_path, (4, 5, 6), LPS, "b.nii.gz")
    check_same_grid(a, b)
    c = _shifted_grid(tmp_path, (4, 5, 7), LPS, "c.nii.gz")
    with pytest.raises(ValueError, match="fixed and moving.*shapes"):
        check_same_grid(a, c, names=("fixed", "moving"))
    shifted = LPS.copy()
    shifted[0, 3] += 0.5
    d = _shifted_grid(tmp_path, (4, 5, 6), shifted, "d.nii.gz")
    with pytest.raises(ValueError, match="fixed and labels.*affines"):
        check_same_grid(a, d, names=("fixed", "labels"))


def test_volume_with_data_errors():
    vol = Volume(np.zeros((2, 3, 4), np.float32), np.eye(4), np.array([[0, 1], [1, 1], [2, 1]]))
    with pytest.raises(ValueError, match="does not match"):
        vol.with_data(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="does not match"):
        vol.to_file_orientation(np.zeros((3, 3, 4)))


# ----------------------------------------------------------------------------- atomic files
def test_atomic_output(tmp_path):
    target = tmp_path / "result.json"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("result.json") and tmp != target
        tmp.write_text(json.dumps({"dice": 0.5}))
        assert not target.exists()
    assert json.loads(target.read_text()) == {"dice": 0.5}
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"dice": 0.5}  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with (
        pytest.raises(FileNotFoundError, match="nothing was written"),
        atomic_output(tmp_path / "empty.json"),
    ):
        pass
    with (
        pytest.raises(FileNotFoundError, match="folder"),
        atomic_output(tmp_path / "no" / "x.json"),
    ):
        pass


# ---------------------------------------------------------------------------------- real CT
def test_real_ct(ct_dir):
    ct = load_volume(ct_dir / "ct.nii.gz")
    labels = load_labels(ct_dir / "labels_btcv13.nii.gz")
    assert ct.shape == (122, 101, 112) and ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    check_same_grid(ct, labels, names=("ct", "labels"))
    assert -1100 < np.percentile(ct.data, 1) < -900 and labels.data.max() == 13
