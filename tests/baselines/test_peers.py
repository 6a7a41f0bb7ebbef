"""Tests of the ANTs / elastix adapters and their RAS <-> LPS geometry."""

from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pytest
import torch

from voxelopt.baselines.ants import AntsSyN, ants_available
from voxelopt.baselines.elastix import ElastixBSpline, elastix_available
from voxelopt.baselines.itk_space import (
    INSTALL_HINT,
    ItkGeometry,
    physical_to_voxel_displacement,
)
from voxelopt.features.intensity import window
from voxelopt.metrics import dice, mean_over_labels
from voxelopt.phantom import make_phantom
from voxelopt.transform import warp

HAS_ANTS = importlib.util.find_spec("ants") is not None
HAS_ELASTIX = importlib.util.find_spec("itk") is not None and elastix_available()[0]

SPACING = (8.0, 10.0, 9.0)  # anisotropic on purpose
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = (-120.0, 35.0, 12.5)
SHIFT = (2.0, -1.5, 1.0)  # voxels: fixed(x) = moving(x + SHIFT)


@pytest.fixture(scope="module")
def translated_pair():
    hu, lab = make_phantom((36, 28, 36), SPACING, seed=1)
    moving, moving_lab = torch.from_numpy(hu)[None, None], torch.from_numpy(lab)[None, None]
    u = torch.tensor(SHIFT).view(1, 3, 1, 1, 1).expand(1, 3, *hu.shape).contiguous()
    fixed = warp(moving, u, padding_mode="border")
    return fixed, warp(moving_lab, u, "nearest"), moving, moving_lab


def _mean_dice(a, b) -> float:
    return mean_over_labels(dice(a[0, 0].numpy(), b[0, 0].numpy()))


def _check_translation(u, pair, atol):
    fixed, fixed_lab, moving, moving_lab = pair
    assert u.shape == (1, 3, *fixed.shape[2:]) and u.dtype == torch.float32
    inner = u[..., 6:-6, 6:-6, 6:-6].flatten(2).median(-1).values.flatten()
    assert torch.allclose(inner, torch.tensor(SHIFT), atol=atol), inner
    before = _mean_dice(moving_lab, fixed_lab)
    after = _mean_dice(warp(moving_lab, u, "nearest"), fixed_lab)
    assert after > before + 0.15, (before, after)


# ------------------------------------------------------------------------------- geometry
def test_geometry_of_a_ras_affine():
    g = ItkGeometry.from_affine(AFFINE)
    np.testing.assert_allclose(g.spacing, SPACING)
    np.testing.assert_allclose(g.origin, (120.0, -35.0, 12.5))  # LPS = (-R, -A, S)
    np.testing.assert_allclose(g.direction, np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(g.voxel_to_physical([1, 1, 1]), (112.0, -45.0, 21.5))


def test_physical_displacement_to_voxels():
    g = ItkGeometry.from_affine(AFFINE)
    disp = np.zeros((2, 3, 4, 3))
    disp[..., 0] = -16.0  # 16 mm towards L in LPS = +16 mm towards R = +2 voxels of axis 0
    disp[..., 1] = 10.0  # 10 mm posterior = -1 voxel of axis 1 (anterior)
    disp[..., 2] = 4.5  # 4.5 mm superior = +0.5 voxel of axis 2
    u = physical_to_voxel_displacement(disp, g)
    assert u.shape == (1, 3, 2, 3, 4)
    torch.testing.assert_close(u[0, :, 1, 2, 3], torch.tensor([2.0, -1.0, 0.5]))
    with pytest.raises(ValueError, match="disp_lps"):
        physical_to_voxel_displacement(disp[..., :2], g)


@pytest.mark.parametrize("affine", [np.eye(3), np.zeros((4, 4)), np.full((4, 4), np.nan)])
def test_bad_affine(affine):
    with pytest.raises(ValueError, match="affine"):
        ItkGeometry.from_affine(affine)


@pytest.mark.parametrize("cls", [AntsSyN, ElastixBSpline])
def test_bad_arguments(cls):
    with pytest.raises(ValueError, match="threads"):
        cls(AFFINE, threads=0)


def test_bad_elastix_transform():
    with pytest.raises(ValueError, match="transforms"):
        ElastixBSpline(AFFINE, ("demons",))


# ------------------------------------------------------------------------------- missing packages
@pytest.mark.parametrize(
    "module, available, cls",
    [("ants", ants_available, AntsSyN), ("itk", elastix_available, ElastixBSpline)],
)
def test_missing_package_gives_install_hint(monkeypatch, module, available, cls):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    ok, reason = available()
    assert not ok and INSTALL_HINT in reason
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        cls(AFFINE)(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


# ------------------------------------------------------------------------------- conventions
@pytest.mark.skipif(not HAS_ANTS, reason=f"antspyx is not installed ({INSTALL_HINT})")
def test_ants_translation_convention(translated_pair):
    model = AntsSyN(AFFINE, "Translation", threads=1)
    _check_translation(model(*translated_pair[0:3:2]), translated_pair, atol=0.3)


@pytest.mark.skipif(not HAS_ANTS, reason=f"antspyx is not installed ({INSTALL_HINT})")
def test_ants_syn_improves_dice(translated_pair):
    model = AntsSyN(AFFINE, "SyN", threads=1)
    _check_translation(model(*translated_pair[0:3:2]), translated_pair, atol=0.6)


@pytest.mark.skipif(not HAS_ELASTIX, reason=f"itk-elastix is not installed ({INSTALL_HINT})")
def test_elastix_translation_convention(translated_pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ElastixBSpline(AFFINE, ("translation",), iterations=100, threads=1)
    _check_translation(model(*translated_pair[0:3:2]), translated_pair, atol=0.3)
    assert list(tmp_path.iterdir()) == []  # transformix's field file stays out of the cwd


@pytest.mark.skipif(not HAS_ELASTIX, reason=f"itk-elastix is not installed ({INSTALL_HINT})")
def test_elastix_bspline_improves_dice(translated_pair):
    model = ElastixBSpline(
        AFFINE, iterations=60, threads=1, parameters={"Metric": ["AdvancedMattesMutualInformation"]}
    )
    u = model(*translated_pair[0:3:2])
    fixed, fixed_lab, moving, moving_lab = translated_pair
    inner = u[..., 6:-6, 6:-6, 6:-6].flatten(2).median(-1).values.flatten()
    assert (inner * torch.tensor(SHIFT)).min() > 0, inner  # every axis moves the right way
    before = _mean_dice(moving_lab, fixed_lab)
    assert _mean_dice(warp(moving_lab, u, "nearest"), fixed_lab) > before + 0.15


# ------------------------------------------------------------------------------- own grid, start
def test_ras_affine_round_trip():
    rotated = AFFINE.copy()
    c, s = np.cos(0.3), np.sin(0.3)
    rotated[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ AFFINE[:3, :3]
    np.testing.assert_allclose(ItkGeometry.from_affine(rotated).ras_affine(), rotated, atol=1e-12)


def test_moving_geometry_places_the_moving_grid():
    model = AntsSyN(AFFINE)
    assert model.moving_geometry() is model.geometry
    own = AFFINE.copy()
    own[:3, 3] += (5.0, -7.0, 3.0)
    start = np.eye(4)
    start[:3, 3] = (2.0, 1.0, -4.0)  # fixed world p -> moving world p + t
    placed = model.moving_geometry(own, start).ras_affine()
    expected = own.copy()
    expected[:3, 3] -= (2.0, 1.0, -4.0)
    np.testing.assert_allclose(placed, expected, atol=1e-12)
    with pytest.raises(ValueError, match="matrix"):
        model.moving_geometry(own, np.eye(3))
    with pytest.raises(ValueError, match="moving_affine"):
        model.moving_geometry(np.zeros((4, 4)))


T_VOX = np.array([3.0, -2.0, 1.0])  # header move of the moving image (voxels)


def _own_grid_case(translated_pair):
    """The moving image cropped (its own grid) and its header moved by ``T_VOX`` voxels."""
    fixed, _, moving, _ = translated_pair
    lo = np.array([2, 1, 3])  # crop start (voxels): the crop's grid starts there
    crop = moving[0, 0, 2:-2, 1:-2, 3:-1].double().numpy()
    own = AFFINE.copy()
    own[:3, 3] += AFFINE[:3, :3] @ (lo + T_VOX)
    start = np.eye(4)
    start[:3, 3] = AFFINE[:3, :3] @ T_VOX  # undoes the header move
    return fixed[0, 0].double().numpy(), crop, own, start


def _windowed(model, hu: np.ndarray) -> np.ndarray:
    return window(torch.from_numpy(hu), *model.window).numpy()


def _check_total(u, shape, atol):
    """Total displacement against the moved header: SHIFT plus the header's move."""
    assert u.shape == (1, 3, *shape) and u.dtype == torch.float32
    inner = u[..., 6:-6, 6:-6, 6:-6].flatten(2).median(-1).values.flatten()
    expected = torch.tensor(SHIFT) + torch.from_numpy(T_VOX).float()
    assert torch.allclose(inner, expected, atol=atol), (inner, expected)


@pytest.mark.skipif(not HAS_ANTS, reason=f"antspyx is not installed ({INSTALL_HINT})")
@pytest.mark.parametrize("with_start", [False, True], ids=["own_start", "given_start"])
def test_ants_moving_on_its_own_grid(translated_pair, with_start):
    fixed, crop, own, start = _own_grid_case(translated_pair)
    model = AntsSyN(AFFINE, "Translation", threads=1)
    u = model.register_arrays(
        _windowed(model, fixed),
        _windowed(model, crop),
        moving_affine=own,
        matrix=start if with_start else None,
    )
    _check_total(u, fixed.shape, atol=0.3)


@pytest.mark.skipif(not HAS_ELASTIX, reason=f"itk-elastix is not installed ({INSTALL_HINT})")
def test_elastix_moving_on_its_own_grid_from_a_start(translated_pair):
    fixed, crop, own, start = _own_grid_case(translated_pair)
    model = ElastixBSpline(AFFINE, ("translation",), iterations=100, threads=1)
    u = model.register_arrays(
        _windowed(model, fixed), _windowed(model, crop), moving_affine=own, matrix=start
    )
    _check_total(u, fixed.shape, atol=0.3)
