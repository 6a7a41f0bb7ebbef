"""Image-level registration (extractor + solver) and the notebook function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxelopt import VoxelOptRegistration, register
from voxelopt.data import load_abdomen_ct
from voxelopt.features import RawIntensity
from voxelopt.metrics import dice, endpoint_error, mean_over_labels
from voxelopt.phantom import make_pair, make_phantom


@pytest.fixture(scope="module")
def phantom_pair():
    hu, labels = make_phantom((40, 36, 40), spacing=5.0, seed=0)
    return make_pair(hu, labels, max_displacement_mm=15.0, spacing=5.0, seed=1)


class TestVoxelOptRegistration:
    @pytest.mark.parametrize("features", ["raw", "mind"])
    def test_smoke(self, features):
        x = torch.rand(2, 1, 16, 16, 16) * 1000 - 500
        model = VoxelOptRegistration(features, levels=2)
        assert model(x, x.flip(2)).shape == (2, 3, 16, 16, 16)

    def test_downsample_returns_field_on_image_grid(self):
        x = torch.rand(1, 1, 20, 18, 16) * 1000 - 500
        model = VoxelOptRegistration(RawIntensity(), downsample=2, levels=2)
        result = model.solve(x, x)
        assert result.displacement.shape == (1, 3, 20, 18, 16)
        assert result.entropy.shape == (1, 1, 10, 9, 8)

    def test_config_overrides(self):
        model = VoxelOptRegistration("raw", levels=3, argmin="soft")
        assert model.config.levels == 3 and model.config.argmin == "soft"

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"extractor": "sift"}, ValueError, "sift"),
            ({"downsample": 0}, ValueError, "downsample"),
            ({"extractor": RawIntensity(), "extractor_kwargs": {"low": 0}}, ValueError, "name"),
            ({"levels": 0}, ValueError, "levels"),
        ],
    )
    def test_construction_errors(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            VoxelOptRegistration(**kwargs)

    def test_shape_mismatch(self):
        model = VoxelOptRegistration("raw", levels=2)
        with pytest.raises(ValueError, match="resample"):
            model(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


class TestRegister:
    def test_improves_phantom_overlap(self, phantom_pair):
        p = phantom_pair
        before = mean_over_labels(dice(p.moving_labels[0, 0], p.fixed_labels[0, 0]))
        result = register(
            p.fixed_hu[0, 0].numpy(),
            p.moving_hu[0, 0].numpy(),
            fixed_labels=p.fixed_labels[0, 0].numpy(),
            moving_labels=p.moving_labels[0, 0].numpy(),
            features="raw",
            levels=3,
            spacing=5.0,
        )
        assert result.displacement.shape == (3, 40, 36, 40)
        assert result.moved.shape == result.entropy.shape == result.moved_labels.shape
        assert result.metrics["dice"] > before + 0.08
        assert result.metrics["nonpositive_jacobian"] < 0.01

    @pytest.mark.parametrize(
        "fixed, moving, kwargs, match",
        [
            (np.zeros((8, 8)), np.zeros((8, 8)), {}, "3-D"),
            (np.full((8, 8, 8), np.nan), np.zeros((8, 8, 8)), {}, "NaN"),
            (np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), {}, "different grids"),
            (
                np.zeros((8, 8, 8)),
                np.zeros((8, 8, 8)),
                {"fixed_labels": np.zeros((4, 4, 4))},
                "fixed_labels",
            ),
            (np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), {"device": "cuda"}, "cuda"),
        ],
    )
    def test_bad_input(self, fixed, moving, kwargs, match):
        if kwargs.get("device") == "cuda" and torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        with pytest.raises(ValueError, match=match):
            register(fixed, moving, features="raw", levels=1, **kwargs)

    def test_working_spacing_and_affine(self, phantom_pair):
        """A coarser working grid and an affine pre-alignment still return input-grid outputs,
        and the affine stage recovers a pure translation the deformable stage could not."""
        p = phantom_pair
        shift = torch.roll(p.fixed_hu[0, 0], 6, dims=0)  # 30 mm at 5 mm voxels
        labels = torch.roll(p.fixed_labels[0, 0], 6, dims=0)
        kwargs = dict(
            fixed_labels=p.fixed_labels[0, 0], moving_labels=labels, features="raw", levels=2
        )
        plain = register(p.fixed_hu[0, 0], shift, spacing=5.0, working_spacing=10.0, **kwargs)
        aligned = register(p.fixed_hu[0, 0], shift, spacing=5.0, affine="rigid", **kwargs)
        assert plain.displacement.shape == aligned.displacement.shape == (3, 40, 36, 40)
        assert aligned.metrics["dice"] > plain.metrics["dice"] + 0.1
        # the composed field carries the 6-voxel shift along axis 0
        assert np.median(aligned.displacement[0]) == pytest.approx(6.0, abs=0.5)

    def test_one_label_map_is_refused(self):
        with pytest.raises(ValueError, match="without the other"):
            register(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), fixed_labels=np.zeros((8, 8, 8)))

    def test_not_an_array(self):
        with pytest.raises(TypeError, match="fixed"):
            register([[1.0]], np.zeros((8, 8, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_real_ct_known_deformation(ct_dir, seed):
    """Warp the real CT by a known smooth field (up to 24 mm = 8 voxels), register it back."""
    ct, labels = load_abdomen_ct()
    pair = make_pair(ct.data, labels.data, max_displacement_mm=24.0, spacing=ct.spacing, seed=seed)
    present = [k for k in range(1, 14) if (labels.data == k).any()]
    assert len(present) == 12
    before = mean_over_labels(dice(pair.moving_labels[0, 0], pair.fixed_labels[0, 0], present))
    result = register(
        pair.fixed_hu[0, 0],
        pair.moving_hu[0, 0],
        fixed_labels=pair.fixed_labels[0, 0],
        moving_labels=pair.moving_labels[0, 0],
        features="mind",
        spacing=ct.spacing,
    )
    after = mean_over_labels(dice(result.moved_labels, pair.fixed_labels[0, 0].numpy(), present))
    assert after >= before + 0.10, (before, after)
    body = pair.fixed_hu > -500
    disp = torch.from_numpy(result.displacement)[None]
    error_before = endpoint_error(
        torch.zeros_like(pair.true_disp), pair.true_disp, ct.spacing, body
    )
    error_after = endpoint_error(disp, pair.true_disp, ct.spacing, body)
    assert error_after < error_before, (float(error_before), float(error_after))


class _CountingRaw(RawIntensity):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def extract(self, image_hu):
        self.calls += 1
        return super().extract(image_hu)


class TestFixedCache:
    def test_one_forward_per_fixed_image(self):
        extractor = _CountingRaw()
        model = VoxelOptRegistration(extractor, levels=2, cache_fixed=2)
        fixed = torch.rand(1, 1, 12, 12, 12) * 1000 - 500
        movings = [torch.rand_like(fixed) * 1000 - 500 for _ in range(3)]
        fields = [model(fixed, m) for m in movings]
        assert extractor.calls == 1 + 3  # fixed once, each moving once
        uncached = VoxelOptRegistration(RawIntensity(), levels=2)
        for m, u in zip(movings, fields, strict=True):
            torch.testing.assert_close(u, uncached(fixed, m))
        model(fixed.flip(2), movings[0])  # another fixed image: computed again
        assert extractor.calls == 6

    def test_explicit_key(self):
        extractor = _CountingRaw()
        model = VoxelOptRegistration(extractor, levels=2, cache_fixed=1)
        fixed = torch.rand(1, 1, 12, 12, 12)
        model(fixed, fixed, fixed_key="subject-24")
        model(fixed, fixed, fixed_key="subject-24")
        assert extractor.calls == 3

    def test_trainable_extractor_not_cached(self):
        from voxelopt.features import FeatureHead, HeadedExtractor

        extractor = HeadedExtractor(RawIntensity(), FeatureHead(1, 1))
        model = VoxelOptRegistration(extractor, levels=2, cache_fixed=2)
        fixed = torch.rand(1, 1, 12, 12, 12)
        with torch.no_grad():
            model(fixed, fixed)
        assert len(model.fixed_cache) == 0

    def test_invalid(self):
        with pytest.raises(ValueError, match="cache_fixed"):
            VoxelOptRegistration("raw", cache_fixed=-1)


class TestRegisterMasks:
    """``register(..., fixed_mask=, moving_mask=)``: voxels outside a mask carry no signal."""

    @pytest.fixture(scope="class")
    def shifted(self):
        hu, labels = make_phantom((32, 32, 32), seed=0)
        return hu, labels, np.roll(hu, 2, axis=0), np.roll(labels, 2, axis=0)

    def test_mask_changes_only_what_it_covers(self, shifted):
        hu, labels, moved_hu, moved_labels = shifted
        mask = np.ones(hu.shape, np.uint8)
        mask[..., :8] = 0
        kw = {"fixed_labels": labels, "moving_labels": moved_labels, "features": "raw", "levels": 2}
        plain = register(hu, moved_hu, **kw)
        masked = register(hu, moved_hu, moving_mask=mask, **kw)
        change = np.linalg.norm(masked.displacement - plain.displacement, axis=0)
        assert change[..., :8].mean() > 2 * change[..., 16:].mean()
        assert masked.scores.dice_mean > 0.9

    @pytest.mark.parametrize(
        ("name", "mask", "message"),
        [
            ("moving_mask", np.zeros((32, 32, 32)), "moving_mask is empty"),
            ("fixed_mask", np.zeros((32, 32, 32)), "fixed_mask is empty"),
            ("moving_mask", np.ones((30, 32, 32)), "moving_mask and moving are on different"),
        ],
    )
    def test_bad_masks(self, shifted, name, mask, message):
        hu = shifted[0]
        with pytest.raises(ValueError, match=message):
            register(hu, hu, features="raw", levels=2, **{name: mask})
