"""Tests of the working grid, slab resampling and full-resolution warping (voxelopt.grid,
voxelopt.sampling, voxelopt.fullres) on small anisotropic volumes with flipped axes."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import voxelopt.grid as grid_module
from voxelopt.fullres import (
    FieldUpsampler,
    check_corner_aligned,
    upsample_displacement,
    warp_to_fixed,
)
from voxelopt.grid import (
    DEFAULT_VOXEL_BUDGET,
    grid_of,
    resample_to_grid,
    working_grid,
    working_spacing,
)
from voxelopt.io import Volume, load_volume
from voxelopt.sampling import antialias_sigma
from voxelopt.transform import resize_displacement, warp

CANONICAL = np.array([[0, 1], [1, 1], [2, 1]])
# file axes: 0 runs left (0.8 mm), 1 posterior (0.9 mm), 2 superior (2 mm): an LPS file
LPS = np.diag([-0.8, -0.9, 2.0, 1.0])
LPS[:3, 3] = (25.0, 30.0, -12.0)
# file axis 0 runs posterior, axis 1 inferior (flipped z), axis 2 left
PERMUTED = np.array(
    [[0.0, 0.0, -1.2, 40.0], [-0.9, 0.0, 0.0, 10.0], [0.0, -2.5, 0.0, 60.0], [0, 0, 0, 1.0]]
)


def _volume(data, spacing=(0.8, 0.9, 2.0), origin=(-10.0, 5.0, 3.0)) -> Volume:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return Volume(np.asarray(data), affine, CANONICAL.copy())


def _rotation(angle=0.1, shift=(1.3, -2.1, 0.7)) -> np.ndarray:
    m = np.eye(4)
    c, s = math.cos(angle), math.sin(angle)
    m[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    m[:3, 3] = shift
    return m


def _reference(volume: Volume, grid: Volume, order, fill, matrix=None, sigma=(0, 0, 0)):
    """Whole-volume scipy resampling: filter, then map_coordinates (grid-constant)."""
    vox = np.linalg.inv(volume.affine) @ (np.eye(4) if matrix is None else matrix) @ grid.affine
    data = volume.data.astype(np.float64)
    for axis, s in enumerate(sigma):
        if s > 0:
            data = ndimage.gaussian_filter1d(data, s, axis=axis, mode="nearest")
    idx = np.indices(grid.shape, dtype=np.float64).reshape(3, -1)
    coords = vox[:3, :3] @ idx + vox[:3, 3:]
    out = ndimage.map_coordinates(
        data, coords, order=order, mode="grid-constant", cval=fill, prefilter=False
    )
    return out.reshape(grid.shape)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def image(rng) -> Volume:
    return _volume(rng.normal(size=(40, 36, 16)).astype(np.float32))


# ------------------------------------------------------------------------- working_spacing
def test_working_spacing_keeps_own_spacing_under_budget():
    assert working_spacing((64, 64, 40), (0.7, 0.7, 2.5), "auto", 64 * 64 * 40) == (
        0.7,
        0.7,
        2.5,
    )


@pytest.mark.parametrize("budget", [20_000, 50_000, 100_000])
def test_working_spacing_auto_fits_budget_and_is_the_finest(budget):
    shape, own = (128, 128, 40), (0.7, 0.7, 2.5)
    spacing = working_spacing(shape, own, "auto", budget)
    assert math.prod(working_grid(_volume(np.zeros(shape), own), spacing).shape) <= budget
    finer = tuple(max(s * 0.97, o) for s, o in zip(spacing, own, strict=True))
    assert math.prod(working_grid(_volume(np.zeros(shape), own), finer).shape) > budget
    # finest axes are coarsened first: in-plane becomes isotropic, z keeps 2.5 mm until passed
    assert spacing[0] == spacing[1] and spacing[2] == max(2.5, spacing[0])


def test_working_spacing_explicit_never_finer_than_the_image():
    assert working_spacing((10, 10, 10), (0.7, 0.7, 2.5), 2.0) == (2.0, 2.0, 2.5)
    assert working_spacing((10, 10, 10), (0.7, 0.7, 2.5), (1.0, 3.0, 3.0)) == (1.0, 3.0, 3.0)


def test_default_budget_is_a_few_million_voxels():
    assert 1_000_000 <= DEFAULT_VOXEL_BUDGET <= 4_000_000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "fine"}, "spacing must be 'auto'"),
        ({"target": -1.0}, "spacing must be a positive"),
        ({"target": (1.0, 2.0)}, "spacing must be a positive"),
        ({"target": float("nan")}, "spacing must be a positive"),
        ({"budget_voxels": 0}, "budget_voxels"),
        ({"shape": (10, 10)}, "shape must be 3"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing_mm"),
    ],
)
def test_working_spacing_errors(kwargs, match):
    args = {"shape": (200, 200, 200), "spacing_mm": (1.0, 1.0, 1.0), "target": "auto"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        working_spacing(**args)


# ---------------------------------------------------------------------------- working_grid
def _corners(grid: Volume) -> np.ndarray:
    """World coordinates of the 8 corner voxel centres, sorted."""
    idx = np.array(
        [
            (i, j, k)
            for i in (0, grid.shape[0] - 1)
            for j in (0, grid.shape[1] - 1)
            for k in (0, grid.shape[2] - 1)
        ],
        dtype=float,
    )
    world = idx @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return np.array(sorted(map(tuple, np.round(world, 6))))


@pytest.mark.parametrize("file_affine", [LPS, PERMUTED], ids=["lps", "permuted"])
def test_working_grid_keeps_the_world_box_of_flipped_files(tmp_path, file_affine):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 26, 12), np.float32), file_affine), str(path))
    fixed = load_volume(path)
    grid = working_grid(fixed, 3.0)
    assert all(n < m for n, m in zip(grid.shape, fixed.shape, strict=True) if n != m)
    np.testing.assert_allclose(_corners(grid), _corners(fixed), atol=1e-6)
    assert np.all(np.diag(grid.affine)[:3] > 0)  # RAS+ like the volume
    np.testing.assert_array_equal(grid.ornt, fixed.ornt)  # written back in the file's axes
    for n, s in zip(grid.shape, grid.spacing, strict=True):
        assert abs(s - 3.0) <= 3.0 * 0.5 / (n - 1) + 1e-6  # the nearest whole number of voxels
    assert grid.data.nbytes == 4 * math.prod(grid.shape) and grid.data.strides == (0, 0, 0)


def test_working_grid_unchanged_when_not_coarser(image):
    grid = working_grid(image, 0.5)
    assert grid.shape == image.shape
    np.testing.assert_array_equal(grid.affine, image.affine)


def test_working_grid_errors(image):
    with pytest.raises(TypeError, match="volume must be"):
        working_grid(image.data, 2.0)
    with pytest.raises(ValueError, match="spacing"):
        working_grid(image, 0.0)


# ----------------------------------------------------------------------- resample_to_grid
@pytest.mark.parametrize("matrix", [None, "rotation"])
@pytest.mark.parametrize("memory_order", ["C", "F"])
def test_resample_matches_scipy(image, matrix, memory_order):
    volume = _volume(np.asarray(image.data, order=memory_order))
    m = _rotation() if matrix else None
    grid = working_grid(volume, 1.6)
    out = resample_to_grid(volume, grid, 1, -5.0, matrix=m, antialias=False)
    np.testing.assert_allclose(out.data, _reference(volume, grid, 1, -5.0, m), atol=1e-4)
    assert out.data.dtype == np.float32 and out.shape == grid.shape


@pytest.mark.parametrize("matrix", [None, "rotation"])
def test_resample_antialiasing_matches_whole_volume_filter(image, matrix, monkeypatch):
    monkeypatch.setattr(grid_module, "SLAB_VOXELS", 200)  # many slabs, each with margins
    m = _rotation() if matrix else None
    grid = working_grid(image, 2.4)
    vox = np.linalg.inv(image.affine) @ (np.eye(4) if m is None else m) @ grid.affine
    sigma = antialias_sigma(np.linalg.norm(vox[:3, :3], axis=1))
    assert sigma[0] > 1.0 and 0.0 < sigma[2] < sigma[0]  # shrinking most in-plane
    out = resample_to_grid(image, grid, 1, -5.0, matrix=m)
    np.testing.assert_allclose(out.data, _reference(image, grid, 1, -5.0, m, sigma), atol=1e-4)


def test_antialiasing_removes_aliasing():
    d = np.indices((64, 64, 10)).sum(axis=0) % 2  # checkerboard: nothing below Nyquist but 0
    volume = _volume(d.astype(np.float32) * 100.0, spacing=(1.0, 1.0, 1.0))
    grid = working_grid(volume, 3.0)  # every third voxel: the plain samples all alias to 0/100
    plain = resample_to_grid(volume, grid, 1, 0.0, antialias=False).data
    smooth = resample_to_grid(volume, grid, 1, 0.0).data
    assert plain.std() > 45.0 and smooth.std() < 1.0
    assert abs(smooth.mean() - 50.0) < 1.0


def test_antialias_sigma():
    assert antialias_sigma((1.0, 0.5, 3.0)) == (0.0, 0.0, math.sqrt(8.0) / 2)


@pytest.mark.parametrize("memory_order", ["C", "F"])
def test_resample_labels_nearest_without_blur(rng, memory_order):
    labels = np.asarray(rng.integers(0, 6, size=(40, 36, 16)), order=memory_order)
    volume = _volume(labels)
    grid = working_grid(volume, 2.0)
    out = resample_to_grid(volume, grid, 0, 0, matrix=_rotation())
    assert out.data.dtype == labels.dtype
    assert set(np.unique(out.data)) <= set(range(6))
    ref = _reference(volume, grid, 0, 0, _rotation())
    assert np.mean(out.data != ref) < 1e-3  # rounding ties aside


@pytest.mark.parametrize("matrix", [None, "rotation"])
def test_resample_large_label_values_exact(rng, matrix):
    values = np.array([0, 2**40 + 1, 2**40 + 2, 7], dtype=np.int64)
    volume = _volume(values[rng.integers(0, 4, size=(40, 36, 16))])
    grid = working_grid(volume, 2.0)
    m = _rotation() if matrix else None
    out = resample_to_grid(volume, grid, 0, 0, matrix=m)
    assert set(np.unique(out.data)) <= set(values.tolist())
    assert np.mean(out.data != _reference(volume, grid, 0, 0, m)) < 1e-3


def test_resample_identity_grid_returns_the_data(image):
    out = resample_to_grid(image, grid_of(image), 1, 0.0)
    assert out.data is image.data


def test_resample_errors(image):
    grid = working_grid(image, 2.0)
    with pytest.raises(ValueError, match="order"):
        resample_to_grid(image, grid, order=3)
    with pytest.raises(ValueError, match="matrix"):
        resample_to_grid(image, grid, matrix=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="matrix"):
        resample_to_grid(image, grid, matrix=np.eye(3))
    bad = np.eye(4)
    bad[3, 0] = 1.0
    with pytest.raises(ValueError, match="last row"):
        resample_to_grid(image, grid, matrix=bad)
    with pytest.raises(TypeError, match="Volume"):
        resample_to_grid(image.data, grid)


# ------------------------------------------------------------------- full resolution
@pytest.fixture
def field(image):
    grid = working_grid(image, 2.0)
    gen = torch.Generator().manual_seed(0)
    return grid, torch.randn((1, 3, *grid.shape), generator=gen) * 1.5


def test_upsample_displacement_matches_resize(image, field, monkeypatch):
    monkeypatch.setattr(grid_module, "SLAB_VOXELS", 3000)
    grid, disp = field
    out = upsample_displacement(disp, grid, image)
    torch.testing.assert_close(out, resize_displacement(disp, image.shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 0.1])
def test_upsample_with_matrix_is_the_total_displacement(image, field, angle):
    from voxelopt.affine import compose_affine_and_field

    grid, disp = field
    m = _rotation(angle, (2.0, -1.0, 3.0))
    out = upsample_displacement(disp, grid, image, matrix=m)
    ref = compose_affine_and_field(m, resize_displacement(disp, image.shape), image.affine)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    up = FieldUpsampler(disp, grid, image, axis=1, plane_axes=(2, 0), matrix=m)
    torch.testing.assert_close(
        up.slab(5, 9, channel=1)[0], ref[0, 1, :, 5:9].permute(1, 2, 0), atol=1e-4, rtol=1e-5
    )


def test_field_upsampler_on_the_same_grid_is_the_field(image):
    disp = torch.randn((1, 3, *image.shape), generator=torch.Generator().manual_seed(1))
    up = FieldUpsampler(disp, image, image, axis=2, plane_axes=(1, 0), channels=(2, 0))
    ref = disp[0, [2, 0]].permute(0, 3, 2, 1)
    assert torch.equal(up.slab(3, 9), ref[:, 3:9])
    assert torch.equal(up.slab(0, 4, channel=0), ref[1:, 0:4])


def test_field_upsampler_plane_order_and_channels(image, field):
    grid, disp = field
    full = resize_displacement(disp, image.shape)[0]
    up = FieldUpsampler(disp, grid, image, axis=2, plane_axes=(1, 0), channels=(2, 0))
    ref = full[[2, 0], :, :, 3:9].permute(0, 3, 2, 1)
    torch.testing.assert_close(up.slab(3, 9), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(up.slab(3, 9, channel=0), ref[1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="plane_axes"):
        FieldUpsampler(disp, grid, image, axis=2, plane_axes=(2, 0))
    with pytest.raises(ValueError, match="channels"):
        FieldUpsampler(disp, grid, image, channels=(3,))


def _inside(disp_full: torch.Tensor, shape, margin=1.0) -> np.ndarray:
    pos = np.indices(shape) + disp_full[0].numpy()
    return np.all([(pos[i] >= margin) & (pos[i] <= n - 1 - margin) for i, n in enumerate(shape)], 0)


@pytest.mark.parametrize("memory_order", ["C", "F"])
def test_slab_warp_matches_whole_volume_warp(image, field, memory_order, monkeypatch):
    monkeypatch.setattr(grid_module, "SLAB_VOXELS", 2000)  # 2-3 slices per slab
    grid, disp = field
    moving = _volume(np.asarray(image.data, order=memory_order))
    moved = warp_to_fixed(moving, disp, grid, image, 1, -5.0)
    full = resize_displacement(disp, image.shape)
    ref = warp(torch.from_numpy(image.data)[None, None], full, padding_mode="zeros")[0, 0]
    inside = _inside(full, image.shape, margin=0.0)
    np.testing.assert_allclose(moved[inside], ref.numpy()[inside], atol=1e-4)
    assert np.all(moved[~_inside(full, image.shape, margin=-1.0)] == -5.0)  # beyond 1 voxel
    monkeypatch.setattr(grid_module, "SLAB_VOXELS", 1 << 24)  # the whole volume at once
    np.testing.assert_allclose(warp_to_fixed(moving, disp, grid, image, 1, -5.0), moved, atol=1e-4)


def test_warp_labels_nearest_and_compact_dtype(rng, image, field):
    grid, disp = field
    labels = _volume(rng.integers(0, 9, size=image.shape))
    moved = warp_to_fixed(labels, disp, grid, image, 0, 0, dtype=np.uint8)
    full = resize_displacement(disp, image.shape)
    ref = warp(torch.from_numpy(labels.data)[None, None], full, mode="nearest")[0, 0].numpy()
    inside = _inside(full, image.shape, margin=0.0)
    assert moved.dtype == np.uint8
    assert np.mean(moved[inside] != ref[inside]) < 1e-3


def test_warp_large_label_values_exact(image, field):
    grid, disp = field
    values = np.array([0, 2**40 + 1, 2**40 + 2, 7], dtype=np.int64)
    labels = _volume(values[np.indices(image.shape).sum(0) // 5 % 4])
    moved = warp_to_fixed(labels, disp * 0, grid, image, 0, 0)
    np.testing.assert_array_equal(moved, labels.data)


def test_warp_through_matrix_composes_with_the_field(image, field):
    """moving sampled at matrix @ (x + u): a translation by 2 voxels adds 2 to u."""
    grid, disp = field
    m = np.eye(4)
    m[:3, 3] = (2 * image.spacing[0], 0.0, 0.0)
    moved = warp_to_fixed(image, disp, grid, image, 1, 0.0, matrix=m)
    full = resize_displacement(disp, image.shape)
    full[:, 0] += 2.0
    ref = warp(torch.from_numpy(image.data)[None, None], full)[0, 0].numpy()
    np.testing.assert_allclose(moved, ref, atol=1e-4)
    still = warp_to_fixed(image, disp * 0, grid, image, 1, -5.0, matrix=_rotation())
    pre = resample_to_grid(image, grid_of(image), 1, -5.0, matrix=_rotation(), antialias=False)
    np.testing.assert_allclose(still, pre.data, atol=1e-4)


def test_check_corner_aligned(image):
    grid = working_grid(image, 2.0)
    check_corner_aligned(grid, image)
    shifted = Volume(grid.data, grid.affine.copy(), grid.ornt)
    shifted.affine[0, 3] += 1.0
    with pytest.raises(ValueError, match="working grid does not span"):
        check_corner_aligned(shifted, image)
    with pytest.raises(ValueError, match="disp_working must be"):
        upsample_displacement(torch.zeros(1, 3, 4, 4, 4), grid, image)
