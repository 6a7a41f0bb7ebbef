"""voxelopt.export: the NIfTI vector intent and ITK / ANTs displacement-field transforms.

The reference in this file is plain geometry: the fixed voxel ``x`` (canonical index, affine
``A``) corresponds to the moving world point ``M A (x + u(x))``; ITK works in LPS (``F =
diag(-1, -1, 1)``). SimpleITK and ANTsPy (optional) read the exported file and must map every
fixed voxel centre, and resample a moving image, exactly as our own ``warp`` does.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from voxelopt.export import (
    NIFTI_INTENT_VECTOR,
    export_itk_displacement,
    load_itk_displacement,
    save_displacement_nifti,
    set_vector_intent,
)
from voxelopt.io import displacement_to_file_grid, load_volume, save_volume
from voxelopt.transform import warp

F = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


def _oblique() -> np.ndarray:
    """File axis 0 posterior 1.5 mm, axis 1 left 0.8 mm, axis 2 superior 2.5 mm; rotated 0.2 rad."""
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    lin = np.array([[0.0, -0.8, 0.0], [-1.5, 0.0, 0.0], [0.0, 0.0, 2.5]])
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot @ lin, (30.0, -20.0, 15.0)
    return out


LPS = np.diag([-1.5, -0.8, 2.5, 1.0])
LPS[:3, 3] = (40.0, 25.0, -10.0)
AFFINES = {"ras": np.diag([1.2, 2.0, 1.6, 1.0]), "lps": LPS, "permuted_oblique": _oblique()}
FILE_SHAPE = (9, 11, 7)
#: an affine pre-alignment (RAS+ world matrix): small rotation, scaling and translation
MATRIX = np.array(
    [
        [1.02, -0.05, 0.0, 3.0],
        [0.05, 0.98, 0.01, -2.0],
        [0.0, -0.01, 1.01, 1.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def make_fixed(tmp_path, case: str):
    """A fixed image file with the given orientation, and its Volume."""
    rng = np.random.default_rng(0)
    path = tmp_path / f"fixed_{case}.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=FILE_SHAPE).astype(np.float32), AFFINES[case]), path)
    return load_volume(path), path


def grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)


def smooth_field(shape) -> np.ndarray:
    """A smooth known ``(3, D, H, W)`` field of up to ~1.2 voxels."""
    g = grid(shape)
    return np.stack(
        [
            1.2 * np.sin(g[1] / 3.0),
            0.8 * np.cos(g[2] / 2.5 + g[0] / 4.0),
            0.9 * np.sin(g[0] / 2.0 + 1.0),
        ]
    ).astype(np.float32)


def expected_lps(fixed, u: np.ndarray, matrix=None) -> tuple[np.ndarray, np.ndarray]:
    """(fixed points, moving points) in LPS mm per canonical voxel: ``(D, H, W, 3)`` each."""
    a = fixed.affine
    m = np.eye(4) if matrix is None else matrix
    x = np.moveaxis(grid(fixed.shape), 0, -1)
    p = x @ a[:3, :3].T + a[:3, 3]
    q = (x + np.moveaxis(u, 0, -1)) @ (m[:3, :3] @ a[:3, :3]).T + (m[:3, :3] @ a[:3, 3] + m[:3, 3])
    return p * F, q * F


# ------------------------------------------------------------------ Learn2Reg file
@pytest.mark.parametrize("case", list(AFFINES))
def test_save_displacement_nifti(tmp_path, case):
    fixed, _ = make_fixed(tmp_path, case)
    disp = displacement_to_file_grid(smooth_field(fixed.shape), fixed)
    path = save_displacement_nifti(tmp_path / "displacement.nii.gz", disp, fixed.file_affine)
    img = nib.load(path)
    assert img.shape == (*FILE_SHAPE, 3)  # the layout Learn2Reg's evaluation checks
    assert int(img.header["intent_code"]) == NIFTI_INTENT_VECTOR
    assert img.header.get_intent()[0] == "vector"
    assert img.get_data_dtype() == np.float32
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), disp)
    np.testing.assert_allclose(img.affine, fixed.file_affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_save_displacement_nifti_accepts_tensor_and_float64(tmp_path):
    disp = torch.rand(4, 5, 6, 3, dtype=torch.float64)
    path = save_displacement_nifti(tmp_path / "d.nii", disp, torch.eye(4))
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_fdata(), disp.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("disp", "affine", "error"),
    [
        (np.zeros((4, 5, 6, 2), np.float32), np.eye(4), ValueError),  # not 3 components
        (np.zeros((4, 5, 6), np.float32), np.eye(4), ValueError),  # no vector axis
        (np.zeros((4, 5, 6, 3), np.int16), np.eye(4), TypeError),
        (np.full((4, 5, 6, 3), np.nan, np.float32), np.eye(4), ValueError),
        (np.zeros((4, 5, 6, 3), np.float32), np.eye(3), ValueError),
        (np.zeros((4, 5, 6, 3), np.float32), np.diag([1.0, 0.0, 1.0, 1.0]), ValueError),
    ],
)
def test_save_displacement_nifti_errors(tmp_path, disp, affine, error):
    with pytest.raises(error, match=r"disp_file_axes|affine"):
        save_displacement_nifti(tmp_path / "d.nii.gz", disp, affine)
    assert not (tmp_path / "d.nii.gz").exists()


def test_save_displacement_nifti_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder"):
        save_displacement_nifti(tmp_path / "no" / "d.nii.gz", np.zeros((2, 2, 2, 3)), np.eye(4))


def test_set_vector_intent():
    header = set_vector_intent(nib.Nifti1Header())
    assert int(header["intent_code"]) == 1007 and header.get_xyzt_units()[0] == "mm"
    with pytest.raises(TypeError, match="header"):
        set_vector_intent({"intent_code": 0})


# ------------------------------------------------------------------ ITK file, plain reference
@pytest.mark.parametrize("matrix", [None, MATRIX], ids=["field", "field+affine"])
@pytest.mark.parametrize("case", list(AFFINES))
def test_export_itk_file_against_reference(tmp_path, case, matrix):
    """Header as ITK writes vector images; each vector = F (moving point - fixed point) at the
    file voxel, located through the file's own affine (not through our orientation code)."""
    fixed, _ = make_fixed(tmp_path, case)
    u = smooth_field(fixed.shape)
    path = export_itk_displacement(tmp_path / "itk.nii.gz", u, fixed, matrix=matrix)
    img = nib.load(path)
    assert img.shape == (*FILE_SHAPE, 1, 3) and img.header["dim"][0] == 5
    assert int(img.header["intent_code"]) == NIFTI_INTENT_VECTOR
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, fixed.file_affine, atol=1e-5)
    data = img.get_fdata()[:, :, :, 0, :]
    p, q = expected_lps(fixed, u, matrix)
    k = np.moveaxis(grid(FILE_SHAPE), 0, -1)  # file voxel indices
    world = k @ img.affine[:3, :3].T + img.affine[:3, 3]
    x = np.rint((world - fixed.affine[:3, 3]) @ np.linalg.inv(fixed.affine[:3, :3]).T).astype(int)
    want = (q - p)[x[..., 0], x[..., 1], x[..., 2]]
    np.testing.assert_allclose(data, want, atol=1e-4)


def test_export_itk_accepts_batched_tensor(tmp_path):
    fixed, _ = make_fixed(tmp_path, "lps")
    u = smooth_field(fixed.shape)
    a = nib.load(export_itk_displacement(tmp_path / "a.nii.gz", u, fixed)).get_fdata()
    b = export_itk_displacement(tmp_path / "b.nii.gz", torch.from_numpy(u)[None], fixed)
    np.testing.assert_array_equal(a, nib.load(b).get_fdata())


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"like": "fixed.nii.gz"}, TypeError, "like"),
        ({"disp": np.zeros((3, 4, 4, 4), np.float32)}, ValueError, "disp_canonical"),
        ({"disp": np.zeros((2, 11, 9, 7), np.float32)}, ValueError, "disp_canonical"),
        ({"disp": np.zeros((3, 11, 9, 7), np.int32)}, TypeError, "disp_canonical"),
        ({"disp": np.full((3, 11, 9, 7), np.inf, np.float32)}, ValueError, "disp_canonical"),
        ({"matrix": np.eye(3)}, ValueError, "matrix"),
        ({"matrix": np.zeros((4, 4))}, ValueError, "matrix"),
    ],
)
def test_export_itk_errors(tmp_path, change, error, match):
    fixed, _ = make_fixed(tmp_path, "permuted_oblique")
    args = {"disp": smooth_field(fixed.shape), "like": fixed, "matrix": None, **change}
    with pytest.raises(error, match=match):
        export_itk_displacement(tmp_path / "itk.nii.gz", args["disp"], args["like"], args["matrix"])
    assert not (tmp_path / "itk.nii.gz").exists()


# ------------------------------------------------------------------ SimpleITK / ANTsPy
def moving_image(fixed) -> np.ndarray:
    g = grid(fixed.shape)
    return (np.sin(g[0] / 2.0) + np.cos(g[1] / 3.0) * g[2] / 5.0).astype(np.float32)


def inside(u: np.ndarray) -> np.ndarray:
    """Voxels whose sample ``x + u(x)`` lies in the box of voxel centres (both tools agree
    there; outside, grid_sample blends with zeros and ITK pads)."""
    pos = grid(u.shape[1:]) + u
    top = np.array(u.shape[1:]).reshape(3, 1, 1, 1) - 1
    return np.all((pos >= 0) & (pos <= top), axis=0)


@pytest.mark.parametrize("matrix", [None, MATRIX], ids=["field", "field+affine"])
@pytest.mark.parametrize("case", list(AFFINES))
def test_simpleitk_maps_points_like_us(tmp_path, case, matrix):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (optional) is not installed")
    fixed, fixed_path = make_fixed(tmp_path, case)
    u = smooth_field(fixed.shape)
    path = export_itk_displacement(tmp_path / "itk.nii.gz", u, fixed, matrix=matrix)
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    ref = sitk.ReadImage(str(fixed_path))
    p, q = expected_lps(fixed, u, matrix)
    k = np.moveaxis(grid(FILE_SHAPE), 0, -1).reshape(-1, 3).astype(int)
    for kk in k[:: max(1, len(k) // 200)]:  # ITK's own fixed points are ours
        world = fixed.file_affine @ np.r_[kk, 1.0]
        x = tuple(np.rint(np.linalg.inv(fixed.affine) @ world)[:3].astype(int))
        np.testing.assert_allclose(ref.TransformIndexToPhysicalPoint(kk.tolist()), p[x], atol=1e-4)
    got = np.array([tx.TransformPoint(tuple(pt)) for pt in p.reshape(-1, 3)])
    np.testing.assert_allclose(got, q.reshape(-1, 3), atol=1e-4)


@pytest.mark.parametrize("case", list(AFFINES))
def test_simpleitk_resample_equals_warp(tmp_path, case):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (optional) is not installed")
    fixed, fixed_path = make_fixed(tmp_path, case)
    u = smooth_field(fixed.shape)
    moving = moving_image(fixed)
    save_volume(moving, fixed, tmp_path / "moving.nii.gz")
    path = export_itk_displacement(tmp_path / "itk.nii.gz", u, fixed)
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    out = sitk.Resample(
        sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64),
        sitk.ReadImage(str(fixed_path), sitk.sitkFloat64),
        tx,
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat64,
    )
    sitk.WriteImage(out, str(tmp_path / "moved_sitk.nii.gz"))
    theirs = load_volume(tmp_path / "moved_sitk.nii.gz").data
    ours = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
    mask = inside(u)
    assert mask.mean() > 0.5
    np.testing.assert_allclose(theirs[mask], ours[mask], atol=1e-5)


def test_ants_apply_transforms_equals_warp(tmp_path):
    ants = pytest.importorskip("ants", reason="ANTsPy (optional, antspyx) is not installed")
    fixed, fixed_path = make_fixed(tmp_path, "permuted_oblique")
    u = smooth_field(fixed.shape)
    moving = moving_image(fixed)
    save_volume(moving, fixed, tmp_path / "moving.nii.gz")
    path = export_itk_displacement(tmp_path / "itk.nii.gz", u, fixed)
    out = ants.apply_transforms(
        fixed=ants.image_read(str(fixed_path)),
        moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
        transformlist=[str(path)],
        interpolator="linear",
    )
    ants.image_write(out, str(tmp_path / "moved_ants.nii.gz"))
    theirs = load_volume(tmp_path / "moved_ants.nii.gz").data
    ours = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
    mask = inside(u)
    np.testing.assert_allclose(theirs[mask], ours[mask], atol=1e-5)


# ------------------------------------------------------------------ reading ITK fields
@pytest.mark.parametrize("case", list(AFFINES))
def test_load_itk_displacement_inverts_export(tmp_path, case):
    fixed, _ = make_fixed(tmp_path, case)
    u = smooth_field(fixed.shape)
    back = load_itk_displacement(export_itk_displacement(tmp_path / "i.nii.gz", u, fixed), fixed)
    assert back.shape == u.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, u, atol=1e-5)


def test_load_itk_displacement_of_a_simpleitk_field(tmp_path):
    """A field written by ITK itself (as antsRegistration writes its warps)."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (optional) is not installed")
    fixed, fixed_path = make_fixed(tmp_path, "permuted_oblique")
    u = smooth_field(fixed.shape)
    p, q = expected_lps(fixed, u)
    ref = sitk.ReadImage(str(fixed_path))
    file_d = fixed.to_file_orientation(q - p)  # (X, Y, Z, 3) LPS mm, file axes
    img = sitk.GetImageFromArray(np.transpose(file_d, (2, 1, 0, 3)), isVector=True)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(tmp_path / "ants_like.nii.gz"))
    np.testing.assert_allclose(
        load_itk_displacement(tmp_path / "ants_like.nii.gz", fixed), u, atol=1e-5
    )


def test_load_itk_displacement_errors(tmp_path):
    fixed, fixed_path = make_fixed(tmp_path, "lps")
    other, _ = make_fixed(tmp_path, "ras")
    path = export_itk_displacement(tmp_path / "i.nii.gz", smooth_field(fixed.shape), fixed)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_itk_displacement(tmp_path / "missing.nii.gz", fixed)
    with pytest.raises(ValueError, match="vector image"):
        load_itk_displacement(fixed_path, fixed)
    with pytest.raises(ValueError, match="not on the grid"):
        load_itk_displacement(path, other)
    with pytest.raises(TypeError, match="like"):
        load_itk_displacement(path, str(fixed_path))
