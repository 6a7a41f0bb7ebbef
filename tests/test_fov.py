"""Fields of view (:mod:`voxelopt.fov`, :func:`voxelopt.fov.common_view`) and the
registration of scans whose fields of view differ: cropped, padded, shifted, shorter, or with
blanked slices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from voxelopt.evaluation import score_registration
from voxelopt.fov import common_view, coverage, crop_to_extent, data_extent, sample_with_coverage
from voxelopt.fullres import warp_to_fixed
from voxelopt.grid import grid_of, resample_to_grid, working_grid
from voxelopt.io import Volume, load_labels, load_volume
from voxelopt.pipeline import register_volumes

AFFINE = np.array(
    [[2.0, 0, 0, -11.0], [0, 2.5, 0, 4.0], [0, 0, 3.0, 20.0], [0, 0, 0, 1]], dtype=np.float64
)


def noisy(shape=(12, 10, 30), seed=0) -> np.ndarray:
    """A smooth-ish float32 image (values vary in every slice: nothing is trimmed)."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.add.outer(np.arange(shape[0]), np.arange(shape[1])), np.arange(shape[2]))
    return (10.0 * ramp + rng.normal(0, 5, shape)).astype(np.float32)


def volume(data: np.ndarray, affine: np.ndarray = AFFINE, first=(0, 0, 0)) -> Volume:
    """``data`` as a RAS+ volume whose voxel 0 sits where ``affine``'s voxel ``first`` does."""
    a = np.array(affine, dtype=np.float64)
    a[:3, 3] = a[:3, :3] @ np.asarray(first, dtype=np.float64) + a[:3, 3]
    return Volume(data, a, np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64))


def reference_coverage(
    vol: Volume, grid: Volume, matrix=None, extent=None, margin=0.0
) -> np.ndarray:
    """Per-voxel world arithmetic: grid index -> world -> (matrix) -> source index; inside when
    within half a voxel of the data box's outermost voxel centres on every axis, or within
    ``margin`` grid steps beyond (for grids whose axes are parallel to the image's: a grid step
    along source axis ``a`` is the grid's spacing over the image's)."""
    extent = extent or [(0, n - 1) for n in vol.shape]
    to_source = np.linalg.inv(vol.affine)
    matrix = np.eye(4) if matrix is None else matrix
    if margin:
        assert np.allclose(matrix[:3, :3], np.eye(3)), "margin: axis-parallel grids only"
    step = [g / v for g, v in zip(grid.spacing, vol.spacing, strict=True)]
    out = np.zeros(grid.shape, dtype=np.float32)
    for idx in itertools.product(*(range(n) for n in grid.shape)):
        world = grid.affine @ np.array([*idx, 1.0])
        src = to_source @ (matrix @ world)
        out[idx] = all(
            lo - 0.5 - margin * step[a] <= src[a] <= hi + 0.5 + margin * step[a]
            for a, (lo, hi) in enumerate(extent)
        )
    return out


class TestDataExtent:
    @pytest.mark.parametrize("axis", [0, 1, 2])
    @pytest.mark.parametrize("end", ["low", "high", "both"])
    @pytest.mark.parametrize("value", [-1024.0, 0.0])
    def test_constant_edge_slabs_trimmed(self, axis, end, value):
        data = noisy((8, 9, 10))
        n = data.shape[axis]
        index = [slice(None)] * 3
        expected = [(0, s - 1) for s in data.shape]
        if end in ("low", "both"):
            index[axis] = slice(0, 2)
            data[tuple(index)] = value
            expected[axis] = (2, expected[axis][1])
        if end in ("high", "both"):
            index[axis] = slice(n - 3, n)
            data[tuple(index)] = value
            expected[axis] = (expected[axis][0], n - 4)
        assert data_extent(data) == tuple(expected)

    def test_inner_constant_slice_kept(self):
        data = noisy((8, 9, 10))
        data[:, 4] = -1024
        data[:, :, 0] = 7.0
        assert data_extent(data) == ((0, 7), (0, 8), (1, 9))

    @pytest.mark.parametrize("value", [-1000.0, 0.0])
    def test_all_constant_is_full_extent(self, value):
        assert data_extent(np.full((4, 5, 6), value)) == ((0, 3), (0, 4), (0, 5))

    def test_noisy_air_not_trimmed(self):
        rng = np.random.default_rng(1)
        data = noisy((8, 9, 10))
        data[..., -3:] = -1000 + rng.normal(0, 5, (8, 9, 3))
        assert data_extent(data) == ((0, 7), (0, 8), (0, 9))

    def test_integer_labels(self):
        labels = np.zeros((5, 6, 7), dtype=np.int64)
        labels[1:3, 2:4, 3] = 4
        assert data_extent(labels) == ((1, 2), (2, 3), (3, 3))

    @pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5), (0, 4, 5)])
    def test_bad_input(self, shape):
        with pytest.raises(ValueError, match="data must be"):
            data_extent(np.zeros(shape))


class TestCoverage:
    def test_identity_is_none(self):
        vol = volume(noisy())
        assert coverage(vol, grid_of(vol)) is None
        assert coverage(vol, working_grid(vol, 5.0)) is None  # same box, coarser

    def test_shorter_volume(self):
        fixed = volume(noisy())
        moving = volume(noisy()[:, :, :-10])
        out = coverage(moving, grid_of(fixed))
        assert out.dtype == np.float32 and out.shape == fixed.shape
        np.testing.assert_array_equal(out, reference_coverage(moving, grid_of(fixed)))
        assert (out[:, :, 20:] == 0).all() and (out[:, :, :20] == 1).all()

    def test_translation_matrix(self):
        vol = volume(noisy())
        matrix = np.eye(4)
        matrix[:3, 3] = (-2.6, 1.0, 4.0)  # -1.3, 0.4 and 1.33 voxels
        out = coverage(vol, grid_of(vol), matrix)
        np.testing.assert_array_equal(out, reference_coverage(vol, grid_of(vol), matrix))
        assert (out[0] == 0).all() and (out[:, :, -1] == 0).all() and (out[1:, :, :-2] == 1).all()

    def test_rotation_and_coarser_grid(self):
        fixed = volume(noisy())
        moving = volume(noisy()[:, :, 3:-6], first=(0, 0, 3))
        c, s = np.cos(0.2), np.sin(0.2)
        matrix = np.array([[c, -s, 0, 1.5], [s, c, 0, -2.0], [0, 0, 1, 0.7], [0, 0, 0, 1]])
        grid = working_grid(fixed, 5.0)
        assert grid.shape != fixed.shape
        out = coverage(moving, grid, matrix)
        expected = reference_coverage(moving, grid, matrix)
        np.testing.assert_array_equal(out, expected)
        assert 0 < expected.mean() < 1

    def test_extent(self):
        vol = volume(noisy())
        extent = ((1, 10), (0, 9), (2, 25))
        out = coverage(vol, grid_of(vol), extent=extent)
        np.testing.assert_array_equal(out, reference_coverage(vol, grid_of(vol), extent=extent))
        assert out[1:11, :, 2:26].all() and out.sum() == 10 * 10 * 24

    @pytest.mark.parametrize("margin, covered", [(0.0, 20), (0.4, 20), (0.5, 21), (1, 21), (2, 22)])
    def test_margin_on_the_image_grid(self, margin, covered):
        """A moving image 10 slices shorter: ``margin`` grid voxels beyond its last slice
        count (half a voxel is in the box already, so 0.5 reaches the next voxel centre)."""
        fixed = volume(noisy())
        moving = volume(noisy()[:, :, :-10])
        out = coverage(moving, grid_of(fixed), margin=margin)
        np.testing.assert_array_equal(
            out, reference_coverage(moving, grid_of(fixed), margin=margin)
        )
        assert out[..., :covered].all() and not out[..., covered:].any()

    @pytest.mark.parametrize("margin", [0.5, 1.0, 1.7])
    def test_margin_on_a_coarser_translated_grid(self, margin):
        """Margins are counted in grid voxels: 5 mm here, 2, 2.5 and 3 mm in the image."""
        vol = volume(noisy())
        matrix = np.eye(4)
        matrix[:3, 3] = (9.0, -7.0, 11.0)
        grid = working_grid(vol, 5.0)
        out = coverage(vol, grid, matrix, margin=margin)
        expected = reference_coverage(vol, grid, matrix, margin=margin)
        np.testing.assert_array_equal(out, expected)
        plain = reference_coverage(vol, grid, matrix)
        assert (expected >= plain).all() and expected.sum() > plain.sum() and expected.mean() < 1

    def test_margin_grows_a_rotated_coverage(self):
        fixed = volume(noisy())
        moving = volume(noisy()[:, :, 3:-6], first=(0, 0, 3))
        c, s = np.cos(0.2), np.sin(0.2)
        matrix = np.array([[c, -s, 0, 1.5], [s, c, 0, -2.0], [0, 0, 1, 0.7], [0, 0, 0, 1]])
        grid = working_grid(fixed, 5.0)
        plain, wider = coverage(moving, grid, matrix), coverage(moving, grid, matrix, margin=1)
        assert (wider >= plain).all() and wider.sum() > plain.sum()

    def test_margin_covering_everything_is_none(self):
        fixed = volume(noisy())
        moving = volume(noisy()[:, :, :-2])
        assert coverage(moving, grid_of(fixed), margin=1) is not None
        assert coverage(moving, grid_of(fixed), margin=2) is None


ROTATED = np.array(
    [[0.0, 0.0, 3.0, 7.0], [1.8, 0.3, 0.0, -4.0], [-0.4, 2.4, 0.0, 12.0], [0, 0, 0, 1]]
)


class TestCropToExtent:
    @pytest.mark.parametrize("affine", [AFFINE, ROTATED], ids=["diagonal", "oblique"])
    def test_world_positions_kept(self, affine):
        vol = Volume(noisy(), affine.copy(), np.array([[2, -1], [0, 1], [1, 1]], float), None)
        extent = ((2, 9), (1, 8), (4, 25))
        before = vol.affine.copy()
        out = crop_to_extent(vol, extent)
        assert out.shape == (8, 8, 22)
        np.testing.assert_array_equal(vol.affine, before)  # the input is not changed
        np.testing.assert_array_equal(out.ornt, vol.ornt)
        assert np.shares_memory(out.data, vol.data)  # a view
        lo = np.array([e[0] for e in extent])
        for idx in itertools.product(*(range(n) for n in out.shape)):
            src = np.array(idx) + lo
            assert out.data[idx] == vol.data[tuple(src)]
            np.testing.assert_allclose(
                out.affine @ [*idx, 1.0], vol.affine @ [*src, 1.0], rtol=0, atol=1e-9
            )

    def test_whole_extent_is_the_volume(self):
        vol = volume(noisy())
        out = crop_to_extent(vol, tuple((0, n - 1) for n in vol.shape))
        np.testing.assert_array_equal(out.data, vol.data)
        np.testing.assert_array_equal(out.affine, vol.affine)

    def test_resampled_back_onto_the_original_grid(self):
        """Sampled on the uncropped grid, the crop lands where it was cut from."""
        vol = volume(noisy())
        extent = ((3, 10), (0, 9), (5, 20))
        back = resample_to_grid(crop_to_extent(vol, extent), grid_of(vol), 1, -1000.0)
        box = tuple(slice(lo, hi + 1) for lo, hi in extent)
        np.testing.assert_allclose(back.data[box], vol.data[box], rtol=1e-6, atol=1e-3)
        outside = np.ones(vol.shape, dtype=bool)
        outside[box] = False
        np.testing.assert_allclose(back.data[outside], -1000.0, rtol=0, atol=1e-2)


class TestSampleWithCoverage:
    def test_shorter_volume_filled_from_the_border(self):
        fixed = volume(noisy())
        short = noisy()[:, :, :-10]
        grid = grid_of(fixed)
        image, covered = sample_with_coverage(volume(short), grid, fill_value=-1000.0)
        plain = resample_to_grid(volume(short), grid, 1, -1000.0)
        np.testing.assert_array_equal(covered, coverage(volume(short), grid))
        inside = covered == 1
        np.testing.assert_array_equal(image.data[inside], plain.data[inside])
        last = np.broadcast_to(short[:, :, -1:], (12, 10, 10))
        np.testing.assert_allclose(image.data[:, :, 20:], last, rtol=1e-6, atol=1e-3)
        assert image.shape == grid.shape and np.allclose(image.affine, grid.affine)

    def test_translated_and_coarser(self):
        """Every uncovered voxel equals the image at the nearest point of its box (clamped
        source position), sampled plainly with scipy's trilinear ``map_coordinates``."""
        ndimage = pytest.importorskip("scipy.ndimage")
        data = noisy()
        vol = volume(data)
        matrix = np.eye(4)
        matrix[:3, 3] = (5.0, 0.0, -7.0)
        grid = working_grid(vol, 4.0)
        image, covered = sample_with_coverage(vol, grid, matrix, fill_value=-1000.0)
        plain = resample_to_grid(vol, grid, 1, -1000.0, matrix)
        inside = covered == 1
        assert 0 < inside.mean() < 1
        np.testing.assert_array_equal(image.data[inside], plain.data[inside])
        to_source = np.linalg.inv(vol.affine) @ matrix @ grid.affine
        idx = np.argwhere(~inside).astype(np.float64)
        src = idx @ to_source[:3, :3].T + to_source[:3, 3]
        src = np.clip(src, 0, np.array(vol.shape) - 1)
        expected = ndimage.map_coordinates(data.astype(np.float64), src.T, order=1)
        np.testing.assert_allclose(image.data[~inside], expected, rtol=1e-5, atol=1e-2)

    def test_fully_covered(self):
        vol = volume(noisy())
        grid = working_grid(vol, 5.0)
        image, covered = sample_with_coverage(vol, grid, fill_value=-1000.0)
        assert covered is None
        np.testing.assert_array_equal(image.data, resample_to_grid(vol, grid, 1, -1000.0).data)

    def test_padded_slabs_uncovered(self):
        data = noisy()
        padded = np.pad(data, ((0, 0), (0, 0), (3, 4)), constant_values=-1024.0)
        vol = volume(padded, first=(0, 0, -3))
        grid = grid_of(vol)
        image, covered = sample_with_coverage(vol, grid, fill_value=-1000.0)
        assert covered[..., :3].sum() == 0 and covered[..., -4:].sum() == 0
        assert covered[..., 3:-4].all()
        np.testing.assert_allclose(image.data[..., 3:-4], data, rtol=1e-6, atol=1e-3)
        np.testing.assert_allclose(
            image.data[..., :3], np.repeat(data[..., :1], 3, axis=2), rtol=1e-6, atol=1e-3
        )

    def test_padding_changes_nothing_on_a_coarser_grid(self):
        """The volume is cut to its data box before the anti-aliasing: no padding is blurred
        into the box's edge slices."""
        data = noisy()
        vol = volume(data)
        padded = volume(
            np.pad(data, ((0, 0), (0, 0), (5, 5)), constant_values=-1024.0), first=(0, 0, -5)
        )
        grid = working_grid(vol, 6.0)
        ours, covered = sample_with_coverage(padded, grid, fill_value=-1000.0)
        theirs, _ = sample_with_coverage(vol, grid, fill_value=-1000.0)
        assert covered is None
        np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-5, atol=1e-2)

    @pytest.mark.parametrize("margin", [1, 2.5])
    def test_margin(self, margin):
        """The coverage counts ``margin`` grid voxels beyond the box; the image is the same."""
        fixed, short = volume(noisy()), volume(noisy()[:, :, :-10])
        grid = grid_of(fixed)
        image, covered = sample_with_coverage(short, grid, fill_value=-1000.0, margin=margin)
        plain, covered0 = sample_with_coverage(short, grid, fill_value=-1000.0)
        np.testing.assert_array_equal(covered, coverage(short, grid, margin=margin))
        assert covered.sum() > covered0.sum()
        np.testing.assert_array_equal(image.data, plain.data)

    def test_padded_and_margin(self):
        """The margin is counted from the data box, not from the padded array's box."""
        data = noisy()
        vol = volume(
            np.pad(data, ((0, 0), (0, 0), (3, 4)), constant_values=-1024.0), first=(0, 0, -3)
        )
        _, covered = sample_with_coverage(vol, grid_of(vol), fill_value=-1000.0, margin=1)
        assert covered[..., 2:-3].all() and not covered[..., :2].any()
        assert not covered[..., -3:].any()


def _images(seed=0) -> list[Volume]:
    return [volume(noisy(seed=seed)), volume(noisy(seed=seed + 1))]


class TestCommonView:
    """:func:`voxelopt.fov.common_view`: both images at the fill outside the product of
    their coverages, untouched inside."""

    @staticmethod
    def _coverages():
        fixed = np.ones((12, 10, 30), dtype=np.float32)
        fixed[:2] = 0
        moving = np.ones((12, 10, 30), dtype=np.float32)
        moving[..., 25:] = 0
        moving[5, 5, 5] = 0
        return fixed, moving

    @pytest.mark.parametrize("which", ["both", "fixed", "moving"])
    def test_fill_outside_the_common_coverage(self, which):
        images = _images()
        originals = [v.data.copy() for v in images]
        fixed, moving = self._coverages()
        covered = {
            "both": [fixed, moving],
            "fixed": [fixed, None],
            "moving": [None, moving],
        }[which]
        out = common_view(images, covered, -1000.0)
        common = np.ones_like(fixed)
        for c in covered:
            if c is not None:
                common = common * c
        assert 0 < common.mean() < 1
        for image, before, result in zip(images, originals, out, strict=True):
            assert result.data.dtype == np.float32 and result.shape == image.shape
            for i, j, k in itertools.product(*(range(n) for n in image.shape)):
                expected = before[i, j, k] if common[i, j, k] == 1 else -1000.0
                assert result.data[i, j, k] == expected
            np.testing.assert_array_equal(image.data, before)  # the inputs are not changed
            np.testing.assert_array_equal(result.affine, image.affine)
            np.testing.assert_array_equal(result.ornt, image.ornt)

    def test_none_passes_through(self):
        images = _images()
        out = common_view(images, [None, None], -1000.0)
        assert out[0] is images[0] and out[1] is images[1]

    def test_fill_value(self):
        fixed, _ = self._coverages()
        out = common_view(_images(), [fixed, None], 0.0)
        assert (out[0].data[:2] == 0).all() and (out[1].data[:2] == 0).all()


# --- the real CT: fields of view that differ -----------------------------------------------


def _shifted(vol: Volume, data: np.ndarray, first=(0, 0, 0), mm=(0.0, 0.0, 0.0)) -> Volume:
    """``data`` on ``vol``'s axes, voxel 0 at ``vol``'s voxel ``first``, then moved by ``mm``."""
    affine = vol.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.asarray(first, dtype=np.float64) + np.asarray(mm)
    return Volume(data, affine, vol.ornt.copy(), None)


@pytest.fixture(scope="module")
def real(ct_dir):
    """The shared CT, its 13-organ labels, and a cache of registrations by case."""
    ct = load_volume(ct_dir / "ct.nii.gz")
    labels = load_labels(ct_dir / "labels_btcv13.nii.gz")
    return {"ct": ct, "labels": labels, "runs": {}}


def _case(real, name: str):
    """``(moving, moving_labels)`` of one field-of-view case."""
    ct, labels = real["ct"], real["labels"]
    if name.startswith("air"):
        data = ct.data.copy()
        data[:, :, -int(name[3:]) :] = -1000.0  # superior slices blanked to air
        return ct.with_data(data), labels
    if name == "shorter":
        return _shifted(ct, ct.data[:, :, :-10]), _shifted(labels, labels.data[:, :, :-10])
    if name == "cropped":
        first = (10, 0, 0)  # 10 voxels off the low end of axis 0, world positions kept
        return _shifted(ct, ct.data[10:], first), _shifted(labels, labels.data[10:], first)
    if name == "padded":
        pad = ((0, 0), (0, 0), (8, 8))
        return (
            _shifted(ct, np.pad(ct.data, pad, constant_values=-1024.0), (0, 0, -8)),
            _shifted(labels, np.pad(labels.data, pad), (0, 0, -8)),
        )
    if name == "shifted":
        mm = (4.0, -5.0, 6.0)
        return _shifted(ct, ct.data, mm=mm), _shifted(labels, labels.data, mm=mm)
    raise AssertionError(name)


def _register(real, name: str, **options):
    """The registration of the CT to a case's moving image (cached per case and options)."""
    key = (name, tuple(sorted(options.items())))
    if key not in real["runs"]:
        moving, moving_labels = _case(real, name)
        real["runs"][key] = register_volumes(
            real["ct"],
            moving,
            fixed_labels=real["labels"],
            moving_labels=moving_labels,
            extractor="mind",
            **options,
        )
    return real["runs"][key]


def _initial_dice(real, name: str, grid: Volume) -> float:
    """Mean Dice at zero displacement on ``grid``: the moving labels padded with zeros onto it,
    sampled as the pipeline samples them."""
    _, moving_labels = _case(real, name)
    zero = torch.zeros(1, 3, *grid.shape)
    fixed = resample_to_grid(real["labels"], grid, 0, 0).data
    moved = warp_to_fixed(moving_labels, zero, grid, grid, 0, 0)
    scores = score_registration(
        zero,
        spacing=grid.spacing,
        fixed_labels=torch.from_numpy(np.ascontiguousarray(fixed)),
        moved_labels=torch.from_numpy(moved),
    )
    return scores.dice_mean


@pytest.mark.parametrize("slices", [1, 5, 10])
def test_top_slices_air_keep_dice(real, slices):
    """The issue's claim, at the native 3 mm: the CT to itself with its top slices air."""
    result = _register(real, f"air{slices}")
    assert result.working_grid.shape == real["ct"].shape  # the native grid
    assert len(result.scores.labels) == 12
    assert result.scores.dice_mean >= 0.98
    assert result.coverage["moving"] == pytest.approx(1 - slices / real["ct"].shape[2], abs=1e-6)


def test_without_field_of_view_top_air_is_worse(real):
    """Why the feature exists: without it the air slab's box edge pulls the field."""
    on = _register(real, "air10").scores.dice_mean
    off = _register(real, "air10", field_of_view=False).scores.dice_mean
    assert off < 0.8 and on - off > 0.15


def test_shorter_moving_not_worse_than_initial(real):
    """The issue's claim, at the native 3 mm: a moving scan 10 slices shorter."""
    result = _register(real, "shorter")
    initial = _initial_dice(real, "shorter", result.working_grid)
    assert initial < 0.9  # the missing slices cost Dice before registration
    assert result.scores.dice_mean >= initial - 1e-6


@pytest.mark.filterwarnings("ignore:levels=")  # the default 5 levels on a 6 mm grid
@pytest.mark.parametrize("name", ["cropped", "shifted", "padded"])
def test_fields_of_view_against_each_other(real, name):
    """Moving cropped in-plane, padded with constant slabs, or with its header translated:
    registered on a 6 mm grid, no case ends below its initial Dice."""
    result = _register(real, name, spacing=6.0)
    initial = _initial_dice(real, name, result.working_grid)
    assert result.scores.dice_mean >= initial - 1e-6
    if name == "padded":
        assert result.scores.dice_mean >= 0.98
    if name == "shifted":
        assert result.scores.dice_mean > initial + 0.1  # the translation is recovered
