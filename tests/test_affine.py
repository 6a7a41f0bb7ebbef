"""Tests of voxelopt.affine: world matrices as displacements, resampling, ITK files, alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxelopt.affine import (
    AffineAlign,
    AffineResult,
    affine_displacement,
    align_affine,
    check_matrix,
    compose_affine_and_field,
    geometry,
    read_itk_transform,
    read_world_matrix,
    resample_moving,
    voxel_matrix,
    write_itk_transform,
    write_world_matrix,
)
from voxelopt.affine.levels import pool_array
from voxelopt.affine.optimise import rodrigues
from voxelopt.io import Volume, load_volume, resample_to
from voxelopt.transform import compose, warp

CANONICAL = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
LPS = np.diag([-1.0, -1.0, 1.0])


def _world_affine(angle_deg, scale, shift, centre, axis=(0.3, 0.5, 1.0)) -> np.ndarray:
    """``p -> centre + R S (p - centre) + shift`` as a (4, 4) matrix."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    lin = rodrigues(axis * np.deg2rad(angle_deg)) @ np.diag(scale)
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ centre + np.asarray(shift, dtype=np.float64)
    return out


def _oblique_grid() -> np.ndarray:
    """A voxel -> world matrix with anisotropic voxels, a rotation and an origin."""
    g = np.eye(4)
    g[:3, :3] = rodrigues(np.array([0.1, -0.2, 0.15])) @ np.diag([2.0, 1.5, 3.0])
    g[:3, 3] = (-40.0, 12.0, 7.0)
    return g


def _apply(matrix, points):
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def ct(ct_dir):
    return load_volume(ct_dir / "ct.nii.gz")


# ----------------------------------------------------------------------- displacement
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_displacement_matches_numpy(dtype):
    grid = _oblique_grid()
    matrix = _world_affine(12.0, (0.9, 1.1, 1.05), (5.0, -3.0, 8.0), np.array([1.0, 2.0, 3.0]))
    shape = (4, 5, 6)
    disp = affine_displacement(matrix, shape, grid, dtype=dtype)
    assert disp.shape == (1, 3, *shape) and disp.dtype == dtype
    ref = np.empty((3, *shape))
    for x in np.ndindex(*shape):  # plain reference: G^-1 M G x - x, voxel by voxel
        world = grid @ np.array([*x, 1.0])
        ref[(slice(None), *x)] = (np.linalg.inv(grid) @ matrix @ world)[:3] - np.array(x)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(disp[0].numpy(), ref, atol=tol * np.abs(ref).max())


def test_affine_displacement_identity_is_zero():
    disp = affine_displacement(np.eye(4), (3, 4, 5), _oblique_grid())
    assert torch.count_nonzero(disp) == 0


def test_warp_by_displacement_equals_world_sampling(rng):
    """warp(moving on the grid, u_A) == moving sampled at M @ world(x) (interior voxels)."""
    grid = _oblique_grid()
    data = ndimage.gaussian_filter(rng.normal(size=(20, 22, 18)), 2.0).astype(np.float32)
    vol = Volume(data, grid, CANONICAL)
    matrix = _world_affine(
        5.0, (1.05, 0.95, 1.0), (2.0, -1.5, 1.0), _apply(grid, np.array([10, 11, 9]))
    )
    disp = affine_displacement(matrix, vol.shape, grid, dtype=torch.float64)
    warped = warp(torch.from_numpy(data).double()[None, None], disp)[0, 0].numpy()
    sampled = resample_moving(vol, vol, matrix, order=1).data
    inside = (disp[0] + torch.from_numpy(np.indices(vol.shape))).numpy()
    inside = np.all((inside > 0.5) & (inside < np.array(vol.shape)[:, None, None, None] - 1.5), 0)
    assert inside.sum() > 1000
    np.testing.assert_allclose(warped[inside], sampled[inside], atol=1e-4)


# ------------------------------------------------------------------------ composition
def _smooth_field(shape, amplitude, seed):
    r = np.random.default_rng(seed)
    f = np.stack([ndimage.gaussian_filter(r.normal(size=shape), 2.5) for _ in range(3)])
    return torch.from_numpy(f / np.abs(f).max() * amplitude)[None]


def test_compose_equals_transform_compose():
    grid = _oblique_grid()
    shape = (12, 14, 10)
    matrix = _world_affine(
        8.0, (1.1, 0.9, 1.0), (3.0, 1.0, -2.0), _apply(grid, np.array([6, 7, 5]))
    )
    field = _smooth_field(shape, 1.5, 1)
    total = compose_affine_and_field(matrix, field, grid)
    u_a = affine_displacement(matrix, shape, grid, dtype=torch.float64)
    ref = compose(field, u_a, padding_mode="border")
    # trilinear interpolation of an affine field is exact where no border is reached
    pos = field[0] + torch.from_numpy(np.indices(shape)).double()
    inside = torch.all((pos >= 0) & (pos <= torch.tensor(shape).view(3, 1, 1, 1) - 1), dim=0)
    torch.testing.assert_close(total[0][:, inside], ref[0][:, inside], rtol=0, atol=1e-9)


def test_compose_equals_sequential_resampling(rng):
    """moving(M G (x + u_D(x))) two ways: the composed field, and resample-then-warp."""
    grid = _oblique_grid()
    data = ndimage.gaussian_filter(rng.normal(size=(24, 26, 20)), 2.5).astype(np.float32)
    vol = Volume(data, grid, CANONICAL)
    matrix = _world_affine(
        6.0, (1.05, 0.95, 1.02), (1.5, -2.0, 1.0), _apply(grid, np.array([12, 13, 10]))
    )
    field = _smooth_field(vol.shape, 1.5, 2).float()
    aligned = resample_moving(vol, vol, matrix, order=1).data  # affine stage
    step_by_step = warp(torch.from_numpy(aligned)[None, None], field)[0, 0]  # then the field
    total = compose_affine_and_field(matrix, field, grid)
    at_once = resample_moving(vol, vol, None, order=1, displacement=total).data
    inner = (slice(4, -4),) * 3
    diff = np.abs(step_by_step.numpy()[inner] - at_once[inner])
    # two interpolations against one: agreement to the interpolation error of a smooth image
    assert diff.mean() < 0.02 * data.std() and diff.max() < 0.2 * data.std()


def test_compose_gradcheck():
    grid = _oblique_grid()
    matrix = _world_affine(4.0, (1.0, 1.1, 0.9), (1.0, 2.0, 3.0), np.zeros(3))
    field = _smooth_field((3, 4, 3), 1.0, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: compose_affine_and_field(matrix, f, grid), (field,))


# ------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("order", [0, 1])
def test_resample_moving_matches_scipy(rng, monkeypatch, order):
    monkeypatch.setattr(geometry, "CHUNK_VOXELS", 50)  # several chunks
    moving_grid = _oblique_grid()
    fixed_grid = np.diag([2.5, 2.5, 2.0, 1.0])
    fixed_grid[:3, 3] = (-30.0, 5.0, 0.0)
    if order == 1:
        data = rng.normal(size=(15, 16, 14)).astype(np.float32)
    else:
        data = rng.integers(0, 7, size=(15, 16, 14))
    moving = Volume(data, moving_grid, CANONICAL)
    fixed = Volume(np.zeros((10, 11, 12), np.float32), fixed_grid, CANONICAL)
    matrix = _world_affine(9.0, (1.0, 0.9, 1.1), (4.0, 2.0, -3.0), np.array([-10.0, 20.0, 15.0]))
    out = resample_moving(fixed, moving, matrix, order=order, fill_value=-7.0)
    assert out.shape == fixed.shape and out.data.dtype == (np.float32 if order else data.dtype)
    coords = np.linalg.inv(moving_grid) @ matrix @ fixed_grid
    idx = np.indices(fixed.shape).reshape(3, -1)
    q = coords[:3, :3] @ idx + coords[:3, 3:]
    ref = ndimage.map_coordinates(
        data.astype(np.float64), q, order=order, mode="constant", cval=-7.0, prefilter=False
    ).reshape(fixed.shape)
    # compare away from the field of view's edge (the two pad differently there) and, for
    # nearest, away from half-voxel ties
    ok = np.all((q > 0.01) & (q < np.array(data.shape)[:, None] - 1.01), 0).reshape(fixed.shape)
    if order == 0:
        ok &= np.all(np.abs(np.abs(q - np.round(q)) - 0.5) > 1e-3, 0).reshape(fixed.shape)
    far = np.any((q < -1.01) | (q > np.array(data.shape)[:, None] + 0.01), 0).reshape(fixed.shape)
    assert ok.sum() > 100 and far.sum() > 10
    np.testing.assert_allclose(out.data[ok], ref[ok], atol=1e-4)
    np.testing.assert_allclose(out.data[far], -7.0)


def test_resample_moving_identity_equals_resample_to(rng):
    data = rng.normal(size=(9, 10, 11)).astype(np.float32)
    moving = Volume(data, _oblique_grid(), CANONICAL)
    fixed = Volume(np.zeros((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), CANONICAL)
    ref = resample_to(moving, fixed, order=1, fill_value=0.0).data
    out = resample_moving(fixed, moving, np.eye(4), order=1, fill_value=0.0).data
    np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("layout", ["fortran", "permuted", "negative"])
def test_resample_moving_any_memory_layout(rng, layout):
    """NIfTI arrays are Fortran-ordered: they are sampled in place, with the same result."""
    data = rng.normal(size=(9, 10, 11)).astype(np.float32)
    if layout == "fortran":
        other = np.asfortranarray(data)
    elif layout == "permuted":
        other = np.ascontiguousarray(data.transpose(2, 0, 1)).transpose(1, 2, 0)
    else:
        other = np.flip(np.flip(data, 1).copy(), 1)
    assert np.array_equal(other, data) and not other.flags.c_contiguous
    fixed = Volume(np.zeros((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), CANONICAL)
    matrix = _world_affine(9.0, (1.0, 0.9, 1.1), (1.0, 2.0, -1.0), np.array([8.0, 8.0, 8.0]))
    for order in (0, 1):
        ref = resample_moving(fixed, Volume(data, np.eye(4), CANONICAL), matrix, order, -5.0)
        out = resample_moving(fixed, Volume(other, np.eye(4), CANONICAL), matrix, order, -5.0)
        np.testing.assert_allclose(out.data, ref.data, rtol=0, atol=1e-5 * order)  # sum order
    pooled, affine = pool_array(other, np.eye(4), 2.0)
    pooled_ref, affine_ref = pool_array(data, np.eye(4), 2.0)
    torch.testing.assert_close(pooled, pooled_ref)
    np.testing.assert_allclose(affine, affine_ref)


def test_pool_array_geometry():
    """A pooled voxel's world position is the mean world position of the voxels it averages."""
    grid = np.eye(4)
    grid[:3, :3] = rodrigues(np.array([0.1, -0.2, 0.15])) @ np.diag([2.0, 1.0, 4.0])
    grid[:3, 3] = (-40.0, 12.0, 7.0)
    idx = np.indices((12, 16, 5)).astype(np.float32)
    means = np.stack([pool_array(idx[k], grid, 4.0)[0][0, 0].numpy() for k in range(3)])
    _, affine = pool_array(idx[0], grid, 4.0)
    assert means.shape[1:] == (6, 4, 5)  # 2 and 4 voxels averaged, none along axis 2
    pooled = np.indices(means.shape[1:]).reshape(3, -1)
    np.testing.assert_allclose(
        affine[:3, :3] @ pooled + affine[:3, 3:],
        grid[:3, :3] @ means.reshape(3, -1) + grid[:3, 3:],
        atol=1e-4,
    )


# ---------------------------------------------------------------------------- ITK files
def _random_matrix(rng) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rodrigues(rng.normal(size=3) * 0.3) @ np.diag(rng.uniform(0.8, 1.2, 3))
    m[:3, :3] += rng.normal(size=(3, 3)) * 0.05
    m[:3, 3] = rng.normal(size=3) * 30.0
    return m


def test_itk_round_trip(tmp_path, rng):
    matrix = _random_matrix(rng)
    path = write_itk_transform(tmp_path / "affine.tfm", matrix)
    text = path.read_text().splitlines()
    assert text[0] == "#Insight Transform File V1.0"
    assert "Transform: AffineTransform_double_3_3" in text
    assert "FixedParameters: 0 0 0" in text
    np.testing.assert_allclose(read_itk_transform(path), matrix, atol=1e-12)


def test_itk_reads_a_centre(tmp_path):
    # T(p) = A (p - c) + c + t in LPS, A = 2 I, c = (1, 2, 3), t = (10, 0, 0)
    (tmp_path / "c.txt").write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 2 0 0 0 2 0 0 0 2 10 0 0\nFixedParameters: 1 2 3\n"
    )
    m = read_itk_transform(tmp_path / "c.txt")
    p_ras = np.array([4.0, -5.0, 6.0])
    p_lps = LPS @ p_ras
    expected_lps = 2.0 * (p_lps - [1, 2, 3]) + [1, 2, 3] + [10, 0, 0]
    np.testing.assert_allclose(_apply(m, p_ras), LPS @ expected_lps, atol=1e-12)


def test_itk_transform_through_simpleitk(tmp_path, rng):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (optional)")
    matrix = _random_matrix(rng)
    path = write_itk_transform(tmp_path / "affine.tfm", matrix)
    tx = sitk.ReadTransform(str(path))
    points_ras = rng.normal(size=(20, 3)) * 80.0
    for p in points_ras:
        q_lps = np.array(tx.TransformPoint(tuple(float(v) for v in LPS @ p)))
        np.testing.assert_allclose(LPS @ q_lps, _apply(matrix, p), atol=1e-9)
    # and back: a transform SimpleITK writes (with a centre) reads as the same map
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(tuple(float(v) for v in (LPS @ matrix[:3, :3] @ LPS).ravel()))
    aff.SetCenter((5.0, -7.0, 11.0))
    aff.SetTranslation(tuple(float(v) for v in rng.normal(size=3) * 10))
    sitk.WriteTransform(aff, str(tmp_path / "sitk.tfm"))
    back = read_itk_transform(tmp_path / "sitk.tfm")
    for p in points_ras:
        q_lps = np.array(aff.TransformPoint(tuple(float(v) for v in LPS @ p)))
        np.testing.assert_allclose(_apply(back, p), LPS @ q_lps, atol=1e-6)


def test_simpleitk_resample_equals_resample_moving(tmp_path, rng):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (optional)")
    from voxelopt.baselines.itk_space import ItkGeometry

    data = ndimage.gaussian_filter(rng.normal(size=(16, 18, 14)), 2.0).astype(np.float32)
    moving = Volume(data, _oblique_grid(), CANONICAL)
    fixed = Volume(np.zeros((12, 12, 12), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), CANONICAL)
    fixed.affine[:3, 3] = (-36.0, 14.0, 12.0)
    matrix = _world_affine(7.0, (1.05, 0.95, 1.0), (2.0, -1.0, 1.0), np.array([-25.0, 25.0, 22.0]))

    def image(vol):
        img = sitk.GetImageFromArray(np.ascontiguousarray(vol.data.transpose(2, 1, 0)))
        geo = ItkGeometry.from_affine(vol.affine)
        img.SetOrigin(tuple(geo.origin))
        img.SetSpacing(tuple(geo.spacing))
        img.SetDirection(tuple(geo.direction.ravel()))
        return img

    tx = sitk.ReadTransform(str(write_itk_transform(tmp_path / "a.tfm", matrix)))
    res = sitk.Resample(image(moving), image(fixed), tx, sitk.sitkLinear, -99.0)
    ref = sitk.GetArrayFromImage(res).transpose(2, 1, 0)
    out = resample_moving(fixed, moving, matrix, order=1, fill_value=-99.0).data
    v = voxel_matrix(matrix, fixed.affine, moving.affine)  # ITK clamps at the edge, we blend
    q = np.indices(fixed.shape).reshape(3, -1).T @ v[:3, :3].T + v[:3, 3]
    inside = np.all((q >= 0) & (q <= np.array(moving.shape) - 1), axis=1).reshape(fixed.shape)
    assert inside.sum() > 500
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-4)


@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_world_matrix_file_round_trip(tmp_path, rng, suffix):
    matrix = _random_matrix(rng)
    path = write_world_matrix(tmp_path / f"m{suffix}", matrix)
    np.testing.assert_allclose(read_world_matrix(path), matrix, rtol=1e-9, atol=1e-9)
    if suffix == ".json":
        assert "RAS" in json.loads(path.read_text())["convention"]


# ------------------------------------------------------------------------------ errors
def test_check_matrix_errors():
    with pytest.raises(ValueError, match="matrix must be a \\(4, 4\\)"):
        check_matrix(np.eye(3))
    with pytest.raises(ValueError, match="finite"):
        check_matrix(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="last row"):
        check_matrix(np.ones((4, 4)))
    singular = np.eye(4)
    singular[0, 0] = 0.0
    with pytest.raises(ValueError, match="invertible"):
        check_matrix(singular)
    with pytest.raises(TypeError, match="numeric"):
        check_matrix("eye")
    with pytest.raises(ValueError, match="grid_affine"):
        voxel_matrix(np.eye(4), np.zeros((4, 4)))


def test_geometry_errors():
    with pytest.raises(ValueError, match="shape"):
        affine_displacement(np.eye(4), (3, 4), np.eye(4))
    with pytest.raises(ValueError, match="field"):
        compose_affine_and_field(np.eye(4), torch.zeros(1, 2, 3, 3, 3), np.eye(4))
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), CANONICAL)
    with pytest.raises(ValueError, match="order"):
        resample_moving(vol, vol, np.eye(4), order=3)
    with pytest.raises(TypeError, match="moving must be a voxelopt.io.Volume"):
        resample_moving(vol, np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="displacement must be"):
        resample_moving(vol, vol, None, displacement=torch.zeros(1, 3, 2, 2, 2))


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_itk_transform(tmp_path / "missing.tfm")
    (tmp_path / "bad.tfm").write_text("hello\n")
    with pytest.raises(ValueError, match="not an ITK"):
        read_itk_transform(tmp_path / "bad.tfm")
    (tmp_path / "euler.tfm").write_text(
        "#Insight Transform File V1.0\nTransform: Euler3DTransform_double_3_3\n"
        "Parameters: 0 0 0 0 0 0\nFixedParameters: 0 0 0 0\n"
    )
    with pytest.raises(ValueError, match="Euler3DTransform"):
        read_itk_transform(tmp_path / "euler.tfm")
    (tmp_path / "short.tfm").write_text(
        "#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 1 0 0 0 1 0 0 0 1\nFixedParameters: 0 0 0\n"
    )
    with pytest.raises(ValueError, match="12 Parameters"):
        read_itk_transform(tmp_path / "short.tfm")
    with pytest.raises(FileNotFoundError, match="folder"):
        write_itk_transform(tmp_path / "no" / "a.tfm", np.eye(4))
    with pytest.raises(FileNotFoundError):
        read_world_matrix(tmp_path / "missing.json")


def test_align_errors():
    vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), CANONICAL)
    with pytest.raises(ValueError, match="mode must be one of"):
        align_affine(vol, vol, mode="similarity")
    with pytest.raises(ValueError, match="spacing_mm"):
        align_affine(vol, vol, spacing_mm=0.0)
    with pytest.raises(TypeError, match="fixed must be a voxelopt.io.Volume"):
        align_affine(np.zeros((8, 8, 8)), vol)
    with pytest.raises(ValueError, match="no voxel above"):  # all air: nothing to align
        align_affine(vol.with_data(np.full((8, 8, 8), -1000.0, np.float32)), vol, spacing_mm=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        AffineAlign(mode="bspline")
    with pytest.raises(ValueError, match="shapes differ"):
        AffineAlign()(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


# ------------------------------------------------------------------- real CT recovery
def _errors_mm(ct, estimate, truth, z_range=None):
    """Distances (mm) between where two matrices send the body voxels of ``ct``."""
    vox = np.argwhere(ct.data > -500.0)[::5].astype(np.float64)
    if z_range is not None:
        vox = vox[(vox[:, 2] >= z_range[0]) & (vox[:, 2] < z_range[1])]
    world = _apply(ct.affine, vox)
    return np.linalg.norm(_apply(estimate, world) - _apply(truth, world), axis=1)


def _centre(ct):
    return _apply(ct.affine, (np.array(ct.shape) - 1) / 2.0)


@pytest.mark.parametrize("crop", [None, (30, 112)], ids=["full", "cropped"])
def test_recovers_known_affine(ct, crop):
    """10 degrees, scales 0.9 / 1.1, 15 mm: world error below half a voxel (1.5 mm)."""
    truth = _world_affine(10.0, (0.9, 1.1, 1.0), (15.0, -10.0, 8.0), _centre(ct))
    lo, hi = crop or (0, ct.shape[2])
    shift = np.eye(4)
    shift[2, 3] = lo  # moving = slices lo:hi only (a shorter field of view)
    moving = Volume(np.ascontiguousarray(ct.data[:, :, lo:hi]), truth @ ct.affine @ shift, ct.ornt)
    result = align_affine(ct, moving, mode="affine", spacing_mm=6.0)
    err = _errors_mm(ct, result.matrix, truth, (lo, hi))
    half_voxel = 0.5 * min(ct.spacing)
    assert err.mean() < half_voxel and err.max() < half_voxel, (err.mean(), err.max())
    assert result.cost_final < result.cost_initial
    assert result.overlap > (0.9 if crop is None else 0.6)  # the crop leaves ~70 % covered
    json.dumps(result.to_dict())


def test_rigid_mode_is_orthonormal(ct):
    truth = _world_affine(10.0, (1.0, 1.0, 1.0), (15.0, -10.0, 8.0), _centre(ct))
    moving = Volume(ct.data, truth @ ct.affine, ct.ornt)
    result = align_affine(ct, moving, mode="rigid", spacing_mm=6.0)
    lin = result.matrix[:3, :3]
    np.testing.assert_allclose(lin.T @ lin, np.eye(3), atol=1e-9)
    assert np.linalg.det(lin) > 0
    err = _errors_mm(ct, result.matrix, truth)
    assert err.max() < 0.5 * min(ct.spacing), err.max()
    assert isinstance(result, AffineResult) and result.mode == "rigid"


def test_rigid_fit_of_an_affine_stays_rigid(ct):
    truth = _world_affine(5.0, (0.9, 1.1, 1.0), (5.0, 0.0, 0.0), _centre(ct))
    moving = Volume(ct.data, truth @ ct.affine, ct.ornt)
    lin = align_affine(ct, moving, mode="rigid", spacing_mm=8.0).matrix[:3, :3]
    np.testing.assert_allclose(lin.T @ lin, np.eye(3), atol=1e-9)


def test_module_recovers_a_shift(ct):
    """AffineAlign on tensors of one grid: moving = fixed shifted by 3 voxels along W."""
    hu = torch.from_numpy(ct.data[::2, ::2, ::2].copy())[None, None]  # 6 mm voxels
    moving = torch.full_like(hu, -1000.0)
    moving[..., 3:] = hu[..., :-3]  # moving(x) = fixed(x - 3 e_W): u = +3 voxels along W
    module = AffineAlign(mode="rigid", spacing_mm=6.0)
    disp = module(hu, moving, spacing=6.0)
    assert disp.shape == (1, 3, *hu.shape[2:]) and disp.dtype == hu.dtype
    body = (hu[0, 0] > -500.0) & (torch.arange(hu.shape[-1]) < hu.shape[-1] - 4)
    mean = disp[0][:, body].mean(dim=1)
    torch.testing.assert_close(mean, torch.tensor([0.0, 0.0, 3.0]), atol=0.25, rtol=0)
    assert len(module.last_results) == 1
