"""Uninformative voxels (:mod:`voxelopt.masking`): masks, their erosion, the level support, the
offsets that leave the moving data, the mask pyramid, normalised smoothing, the whole solver
with masks, and user masks through :func:`voxelopt.pipeline.register_volumes`."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxelopt import VoxelOpt, VoxelOptRegistration
from voxelopt.config import VoxelOptConfig
from voxelopt.filtering import side_weight, smooth
from voxelopt.masking import Smoothing, Support, box_max, check_mask, erode, level_support
from voxelopt.phantom import make_phantom
from voxelopt.pipeline import register_volumes, volume_from_array
from voxelopt.pyramid import _pyramid
from voxelopt.transform import pyramid_shapes


def smooth_features(shape=(24, 24, 24), channels=4, seed=0) -> torch.Tensor:
    """Random features with structure at several scales (so shifts are identifiable)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, *[s // 4 for s in shape], generator=g)
    fine = torch.rand(1, channels, *shape, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return up + 0.3 * fine


def reference_erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """Per-voxel loops: 1 where every in-array voxel of the cube of half-width ``voxels``
    around it has ``mask >= 0.5`` (outside the array counts as inside the mask)."""
    b, _, d, h, w = mask.shape
    values = mask.tolist()
    out = torch.zeros_like(mask)
    r = range(-voxels, voxels + 1)
    for n, i, j, k in itertools.product(range(b), range(d), range(h), range(w)):
        inside = True
        for di, dj, dk in itertools.product(r, r, r):
            p, q, s = i + di, j + dj, k + dk
            if 0 <= p < d and 0 <= q < h and 0 <= s < w and values[n][0][p][q][s] < 0.5:
                inside = False
        out[n, 0, i, j, k] = float(inside)
    return out


def random_mask(shape, keep=0.8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < keep).float()


class TestCheckMask:
    def test_smoke(self, dtype):
        like = torch.rand(2, 3, 4, 5, 6, dtype=dtype)
        mask = torch.ones(1, 1, 4, 5, 6, dtype=torch.bool)
        mask[..., 0] = False
        out = check_mask(mask, like, "fixed_mask")
        assert out.shape == (2, 1, 4, 5, 6) and out.dtype == dtype
        assert torch.equal(out[1], out[0]) and out[..., 0].eq(0).all() and out[..., 1:].eq(1).all()
        assert check_mask(None, like, "fixed_mask") is None

    def test_fractional_values_kept(self):
        like = torch.rand(1, 2, 3, 3, 3)
        mask = torch.full((1, 1, 3, 3, 3), 0.25)
        assert torch.equal(check_mask(mask, like, "m"), mask)

    def test_three_d_input_expanded(self):
        like = torch.rand(2, 2, 4, 5, 6)
        mask = random_mask((4, 5, 6))
        out = check_mask(mask, like, "moving_mask")
        assert out.shape == (2, 1, 4, 5, 6)
        assert torch.equal(out[0, 0], mask) and torch.equal(out[1, 0], mask)

    def test_type(self):
        with pytest.raises(TypeError, match="moving_mask"):
            check_mask(torch.ones(4, 5, 6).numpy(), torch.rand(1, 1, 4, 5, 6), "moving_mask")

    @pytest.mark.parametrize(
        "shape", [(1, 1, 4, 5, 7), (1, 2, 4, 5, 6), (4, 5), (1, 4, 5, 6), (4, 5, 7)]
    )
    def test_shape(self, shape):
        with pytest.raises(ValueError, match="fixed_mask must be"):
            check_mask(torch.ones(shape), torch.rand(2, 3, 4, 5, 6), "fixed_mask")

    def test_batch(self):
        with pytest.raises(ValueError, match="fixed_mask has batch size 3"):
            check_mask(torch.ones(3, 1, 4, 5, 6), torch.rand(2, 3, 4, 5, 6), "fixed_mask")

    @pytest.mark.parametrize("bad", [-0.1, 1.5, 2, math.nan, math.inf])
    def test_values(self, bad):
        mask = torch.ones(1, 1, 4, 5, 6)
        mask[0, 0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"moving_mask must hold values in \[0, 1\]"):
            check_mask(mask, torch.rand(1, 1, 4, 5, 6), "moving_mask")

    def test_integer_labels_rejected(self):
        labels = torch.zeros(4, 5, 6, dtype=torch.int64)
        labels[1] = 3
        with pytest.raises(ValueError, match="moving_mask"):
            check_mask(labels, torch.rand(1, 1, 4, 5, 6), "moving_mask")


class TestBoxMax:
    @pytest.mark.parametrize("shape", [(1, 1, 6, 5, 7), (2, 3, 4, 9, 2), (1, 1, 1, 4, 3)])
    @pytest.mark.parametrize("voxels", [1, 2, 3])
    def test_against_max_pool(self, shape, voxels):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(voxels))
        expected = F.max_pool3d(x, 2 * voxels + 1, stride=1, padding=voxels)
        assert torch.equal(box_max(x, voxels), expected)

    def test_against_loops(self):
        x = torch.rand(1, 1, 4, 5, 3, dtype=torch.float64)
        out = box_max(x, 1)
        for i, j, k in itertools.product(range(4), range(5), range(3)):
            box = x[0, 0, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, max(k - 1, 0) : k + 2]
            assert out[0, 0, i, j, k] == box.max()

    def test_zero_is_a_copy_and_input_untouched(self):
        x = torch.rand(1, 1, 3, 3, 3)
        kept = x.clone()
        out = box_max(x, 0)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
        box_max(x, 2)
        assert torch.equal(x, kept)

    @pytest.mark.parametrize("voxels", [-1, 1.5])
    def test_bad_voxels(self, voxels):
        with pytest.raises(ValueError, match="voxels"):
            box_max(torch.rand(1, 1, 3, 3, 3), voxels)


class TestErode:
    @pytest.mark.parametrize("voxels", [0, 1, 2])
    def test_against_reference(self, voxels):
        mask = random_mask((2, 1, 8, 9, 10), keep=0.99, seed=voxels)
        mask[0, 0, 1, 1, 1] = mask[0, 0, 7, 8, 9] = 0  # a hole near a corner, one in a corner
        mask[0, 0, 5, 5, 5] = 0.5  # counts as inside
        mask[1, 0, 3, 3, 3] = 0.49  # does not
        out = erode(mask, voxels)
        expected = reference_erode(mask, voxels)
        assert out.shape == mask.shape and out.dtype == mask.dtype
        assert torch.equal(out, expected)
        assert expected.sum() > 0 and (expected == 0).sum() > 0  # both cases occur

    @pytest.mark.parametrize("voxels", [1, 2, 5])
    def test_box_edge_does_not_erode(self, voxels):
        assert torch.equal(erode(torch.ones(1, 1, 5, 6, 7), voxels), torch.ones(1, 1, 5, 6, 7))

    def test_slab_grows_by_voxels(self):
        mask = torch.ones(1, 1, 6, 6, 12, dtype=torch.float64)
        mask[..., 5:7] = 0
        out = erode(mask, 2)
        assert out.dtype == torch.float64
        assert out[..., 3:9].eq(0).all() and out[..., :3].eq(1).all() and out[..., 9:].eq(1).all()

    @pytest.mark.parametrize("voxels", [-1, 1.5, "2", None])
    def test_bad_voxels(self, voxels):
        with pytest.raises(ValueError, match="voxels"):
            erode(torch.ones(1, 1, 3, 3, 3), voxels)


class TestLevelSupport:
    def test_none_without_masks(self):
        assert level_support(None, None) is None

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_fixed_only(self, dtype):
        fixed = random_mask((1, 1, 5, 6, 7), seed=1).to(dtype)
        fixed[0, 0, 0, 0, 0], fixed[0, 0, 1, 1, 1] = 0.5, 0.49
        support = level_support(fixed, None)
        assert support.moving is None and support.weight.dtype == dtype
        assert torch.equal(support.weight, (fixed >= 0.5).to(dtype))
        assert support.weight[0, 0, 0, 0, 0] == 1 and support.weight[0, 0, 1, 1, 1] == 0

    @pytest.mark.parametrize("search", [0, 1, 2])
    def test_moving_eroded_by_the_search(self, search):
        """The informative voxels: the thresholded moving mask eroded by the search half-width
        (a hole grows to a cube); ``moving`` keeps the thresholded mask itself."""
        moving = torch.ones(1, 1, 7, 8, 9)
        moving[0, 0, 3, 4, 4] = 0
        moving[0, 0, 6, 7, 8] = 0.5  # counts
        moving[0, 0, 0, 0, 0] = 0.49  # does not
        support = level_support(None, moving, search)
        binary = torch.ones_like(moving)
        binary[0, 0, 3, 4, 4] = binary[0, 0, 0, 0, 0] = 0
        expected = torch.ones_like(moving)
        for i, j, k in ((3, 4, 4), (0, 0, 0)):
            box = tuple(slice(max(0, c - search), c + search + 1) for c in (i, j, k))
            expected[(0, 0, *box)] = 0
        assert torch.equal(support.moving, binary)
        assert torch.equal(support.weight, expected)

    def test_product(self):
        fixed = random_mask((2, 1, 5, 6, 7), keep=0.8, seed=3)
        moving = random_mask((2, 1, 5, 6, 7), keep=0.9, seed=4)
        support = level_support(fixed, moving, 0)
        expected = fixed * moving
        assert torch.equal(support.weight, expected) and torch.equal(support.moving, moving)
        eroded = level_support(fixed, moving, 1)
        assert torch.equal(eroded.weight, fixed * erode(moving, 1))
        assert support.informative_fraction == pytest.approx(float(expected.mean()))
        assert 0 < support.informative_fraction < float(fixed.mean())


def reference_offsets(k: int) -> list[tuple[int, int, int]]:
    """The cost's channel order, written out: the zero offset, then the rest, last axis
    fastest."""
    r = range(-k, k + 1)
    return [(0, 0, 0)] + [o for o in itertools.product(r, r, r) if o != (0, 0, 0)]


def reference_mask_offsets(
    cost: torch.Tensor, moving: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per voxel and offset: the offset is valid where ``moving >= 0.5`` at the voxel it leads
    to, with the index clamped into the array (beyond the box the nearest voxel answers); an
    invalid entry takes the voxel's largest valid cost; a voxel with no valid offset stays.

    Returns:
        The masked cost and the ``(B, D, H, W)`` bool map of voxels with a valid offset.
    """
    b, _, d, h, w = cost.shape
    values, mask = cost.tolist(), moving.tolist()
    out = cost.clone()
    some_valid = torch.zeros(b, d, h, w, dtype=torch.bool)
    offsets = reference_offsets(k)
    for n, i, j, l in itertools.product(range(b), range(d), range(h), range(w)):
        valid = []
        for di, dj, dl in offsets:
            p, q = min(max(i + di, 0), d - 1), min(max(j + dj, 0), h - 1)
            s = min(max(l + dl, 0), w - 1)
            valid.append(mask[n][0][p][q][s] >= 0.5)
        if not any(valid):
            continue
        some_valid[n, i, j, l] = True
        worst = max(values[n][c][i][j][l] for c in range(len(offsets)) if valid[c])
        for c in range(len(offsets)):
            if not valid[c]:
                out[n, c, i, j, l] = worst
    return out, some_valid


class TestMaskOffsets:
    @staticmethod
    def case(k: int, dtype=torch.float64, seed=0):
        """A 2-sample cost on a 4 x 5 x 6 grid; the moving masks have holes, a face without
        data (sample 0: last W slice) and a corner block where no offset is valid (sample 1)."""
        g = torch.Generator().manual_seed(seed)
        shape = (2, 1, 4, 5, 6)
        cost = torch.rand(2, (2 * k + 1) ** 3, *shape[2:], generator=g, dtype=torch.float64)
        moving = random_mask(shape, keep=0.85, seed=seed + 10)
        moving[0, 0, ..., -1] = 0
        moving[0, 0, 1, 2, 2] = 0.5  # counts as data
        moving[0, 0, 2, 2, 3] = 0.49  # does not
        moving[1] = 1
        moving[1, 0, :3, :3, :3] = 0  # voxels (0..1)^3 reach no data (even clamped at the box)
        moving[1, 0, 3, 4, 1] = 0
        return cost.to(dtype), moving.to(dtype)

    @pytest.mark.parametrize("k", [1, 2])
    def test_against_reference(self, k, dtype):
        """Every voxel that has a valid offset (those without: see
        test_no_valid_offset_unchanged)."""
        cost, moving = self.case(k, dtype)
        expected, some_valid = reference_mask_offsets(cost, moving, k)
        support = level_support(None, moving)
        out = support.mask_offsets(cost.clone(), k)
        assert out.shape == cost.shape and out.dtype == dtype
        keep = some_valid[:, None].expand_as(cost)
        assert torch.equal(out[keep], expected[keep])
        changed = (expected != cost) & keep
        assert changed.any() and (~changed & keep).any() and (~some_valid).any()
        # the entries that changed never win: each voxel's minimum is a valid entry
        low = torch.where(changed, math.inf, cost).amin(1)
        assert torch.equal(out.amin(1)[some_valid], low[some_valid])

    def test_in_place_without_gradient(self):
        cost, moving = self.case(1)
        expected, some_valid = reference_mask_offsets(cost, moving, 1)
        out = level_support(None, moving).mask_offsets(cost, 1)
        keep = some_valid[:, None].expand_as(cost)
        assert out is cost and torch.equal(cost[keep], expected[keep])

    def test_replicate_padding_at_the_box(self):
        """An offset out of the box at a face with data stays a candidate; at a face without
        data (the last W slice of sample 0) it does not."""
        cost, moving = self.case(1)
        out = level_support(None, moving).mask_offsets(cost.clone(), 1)
        offsets = reference_offsets(1)
        up_d, up_w = offsets.index((1, 0, 0)), offsets.index((0, 0, 1))
        assert moving[1, 0, 3, 4, 4] == 1 and moving[1, 0, 3, 4, 5] == 1
        assert out[1, up_d, 3, 4, 4] == cost[1, up_d, 3, 4, 4]  # leaves the box at d = 3
        assert out[1, up_w, 3, 4, 5] == cost[1, up_w, 3, 4, 5]  # and at w = 5
        data = (moving[0, 0, :, :, -1] < 0.5) & (moving[0, 0, :, :, -2] >= 0.5)
        i, j = data.nonzero()[0].tolist()  # a voxel at the face without data
        assert out[0, 0, i, j, -2] == cost[0, 0, i, j, -2]  # its offset zero is valid ...
        worst = out[0, :, i, j, -1].max()  # ... the step out of the box is not
        assert out[0, up_w, i, j, -1] == worst

    @pytest.mark.parametrize("k", [1, 2])
    def test_no_valid_offset_unchanged(self, k):
        cost, moving = self.case(k)
        _, some_valid = reference_mask_offsets(cost, moving, k)
        none = ~some_valid[1]
        assert none[: 3 - k, : 3 - k, : 3 - k].all() and int(none.sum()) == (3 - k) ** 3
        for grad in (False, True):
            leaf = cost.clone().requires_grad_(grad)
            out = level_support(None, moving).mask_offsets(leaf, k)
            assert torch.equal(out[1][:, none], cost[1][:, none])

    def test_full_mask_and_no_moving_mask_change_nothing(self):
        cost, _ = self.case(1)
        full = level_support(None, torch.ones(2, 1, 4, 5, 6, dtype=cost.dtype))
        assert torch.equal(full.mask_offsets(cost.clone(), 1), cost)
        fixed_only = level_support(torch.zeros(2, 1, 4, 5, 6, dtype=cost.dtype), None)
        assert fixed_only.mask_offsets(cost, 1) is cost

    @pytest.mark.parametrize("k", [1, 2])
    def test_gradient_path_same_values(self, k):
        cost, moving = self.case(k)
        support = level_support(None, moving)
        leaf = cost.clone().requires_grad_(True)
        out = support.mask_offsets(leaf, k)
        assert out.requires_grad and torch.equal(leaf, cost)  # the input is not overwritten
        assert torch.equal(out.detach(), support.mask_offsets(cost.clone(), k))
        with torch.no_grad():
            assert torch.equal(support.mask_offsets(leaf.detach().clone(), k), out.detach())

    def test_gradcheck(self):
        """Near the face without data of sample 0 (no ties in random costs)."""
        cost, moving = self.case(1)
        cost = cost[:1, :, :3, :3, -3:].clone().requires_grad_(True)
        moving = moving[:1, :, :3, :3, -3:]
        _, some_valid = reference_mask_offsets(cost.detach(), moving, 1)
        assert some_valid.all() and (moving < 0.5).any()
        support = level_support(None, moving)
        assert torch.autograd.gradcheck(
            lambda c: support.mask_offsets(c, 1), (cost,), fast_mode=True
        )


def reference_dilate(x: torch.Tensor) -> torch.Tensor:
    """Per-voxel loops: the largest value in the in-array 3 x 3 x 3 neighbourhood."""
    b, c, d, h, w = x.shape
    values = x.tolist()
    out = torch.empty_like(x)
    for n, ch, i, j, l in itertools.product(range(b), range(c), range(d), range(h), range(w)):
        out[n, ch, i, j, l] = max(
            values[n][ch][p][q][s]
            for p in range(max(i - 1, 0), min(i + 2, d))
            for q in range(max(j - 1, 0), min(j + 2, h))
            for s in range(max(l - 1, 0), min(l + 2, w))
        )
    return out


class TestPyramidDilate:
    SHAPE = (9, 8, 12)

    def test_against_reference(self):
        mask = random_mask((1, 1, *self.SHAPE), keep=0.6, seed=8)
        shapes = pyramid_shapes(self.SHAPE, 3)
        out = _pyramid(mask, shapes, dilate=True)
        expected = [mask]
        for shape in shapes[1:]:
            expected.append(
                F.interpolate(
                    reference_dilate(expected[-1]), size=shape, mode="trilinear", align_corners=True
                )
            )
        assert out[0] is mask
        for ours, theirs, shape in zip(out, expected, shapes, strict=True):
            assert tuple(ours.shape[2:]) == tuple(shape)
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)

    def test_without_dilate_is_plain_resize(self):
        x = torch.rand(1, 2, *self.SHAPE)
        shapes = pyramid_shapes(self.SHAPE, 3)
        out = _pyramid(x, shapes)
        assert torch.equal(
            out[1], F.interpolate(x, shapes[1], mode="trilinear", align_corners=True)
        )
        assert _pyramid(None, shapes, dilate=True) == [None, None, None]

    def test_sliver_on_a_face_keeps_the_coarse_face(self):
        """One fine W slice without data (a scan tilted a degree out of view) does not make a
        coarse face uninformative; without the dilation it does."""
        mask = torch.ones(1, 1, *self.SHAPE)
        mask[..., -1] = 0
        shapes = pyramid_shapes(self.SHAPE, 3)
        plain, dilated = _pyramid(mask, shapes), _pyramid(mask, shapes, dilate=True)
        for level in (1, 2):
            assert (plain[level][..., -1] < 0.5).all()
            assert (dilated[level] >= 0.5).all()

    def test_wide_slab_stays(self):
        """Three fine slices without data still leave the first coarse level's face without
        data: the dilation is one finer voxel per level."""
        mask = torch.ones(1, 1, *self.SHAPE)
        mask[..., -3:] = 0
        coarse = _pyramid(mask, pyramid_shapes(self.SHAPE, 2), dilate=True)[1]
        assert (coarse[..., -1] < 0.5).all() and (coarse[..., :-1] >= 0.5).all()


class TestEntropyMaps:
    def test_reported_and_for_sigma(self):
        k = 27
        g = torch.Generator().manual_seed(0)
        entropy = 0.1 + 2.9 * torch.rand(3, 1, 4, 5, 6, generator=g)
        weight = random_mask((3, 1, 4, 5, 6), keep=0.7, seed=5)
        weight[1] = 0  # a sample with no informative voxel
        entropy[weight == 0] += 10.0  # uninformative values must not leak into either map
        reported, for_sigma = Support(weight).entropy_maps(entropy, k)
        keep = weight > 0
        assert torch.equal(reported[keep], entropy[keep])
        assert torch.allclose(reported[~keep], torch.full_like(reported[~keep], math.log(k)))
        assert torch.equal(for_sigma[keep], entropy[keep])
        for n in (0, 2):
            informative = entropy[n][keep[n]]
            assert for_sigma[n].min() == informative.min()
            assert for_sigma[n].max() == informative.max()
            assert for_sigma[n][~keep[n]].eq(informative.max()).all()
        assert torch.isfinite(reported).all() and torch.isfinite(for_sigma).all()
        assert torch.allclose(for_sigma[1], torch.full_like(for_sigma[1], math.log(k)))


class TestSmoothing:
    @pytest.fixture
    def case(self):
        """A side-weight map, its smoothing S, and an informative mask that leaves a region
        beyond S's reach (3 iterations of 3-tap passes reach 3 voxels along each axis)."""
        g = torch.Generator().manual_seed(1)
        shape = (2, 1, 11, 7, 8)
        sigma = 0.1 + 0.4 * torch.rand(*shape, generator=g, dtype=torch.float64)
        wmap = side_weight(sigma)
        weight = random_mask(shape, keep=0.7, seed=6).double()
        weight[:, :, 4:] = 0  # voxels 7.. along axis 0 are out of reach

        def s(x: torch.Tensor) -> torch.Tensor:
            return smooth(x, wmap, 3)

        return s, weight

    def test_field_is_normalised_convolution(self, case):
        s, weight = case
        v = torch.randn(2, 3, 11, 7, 8, dtype=torch.float64)
        normalised = Support(weight).smoothing(s)
        assert isinstance(normalised, Smoothing)
        out = normalised.after_field(s(normalised.before(v.clone())))
        num, den = s(weight * v), s(weight)  # S(w v), S(w), plainly
        well = (den > 1e-3).expand_as(v)
        assert torch.allclose(out[well], (num / den.clamp(min=1e-300)).expand_as(v)[well])
        unreached = (den == 0).expand_as(v)
        assert unreached.any() and out[unreached].eq(0).all()
        assert out[:, :, 7:].eq(0).all()
        # a weighted average of the informative values: never beyond their range
        informative = v[(weight > 0).expand_as(v)]
        assert out.min() >= informative.min() - 1e-12 and out.max() <= informative.max() + 1e-12

    def test_uninformative_values_do_not_count(self, case):
        s, weight = case
        v = torch.randn(2, 3, 11, 7, 8, dtype=torch.float64)
        garbage = v.clone()
        garbage[(weight == 0).expand_as(v)] = 1e6
        normalised = Support(weight).smoothing(s)
        a = normalised.after_field(s(normalised.before(v.clone())))
        b = normalised.after_field(s(normalised.before(garbage)))
        assert torch.allclose(a, b, rtol=0, atol=1e-9)

    def test_cost_stays_flat_where_uninformative(self, case):
        s, weight = case
        g = torch.Generator().manual_seed(2)
        cost = torch.rand(2, 27, 11, 7, 8, generator=g, dtype=torch.float64)
        support = Support(weight)
        flat = support.flatten_cost(cost.clone())
        off = (weight == 0).expand_as(cost)
        assert flat[off].eq(0).all() and torch.equal(flat[~off], cost[~off])
        out = support.smoothing(s).after_cost(s(flat))
        assert out[off].eq(0).all()
        expected = s(weight * cost) / s(weight)  # informative voxels always reach themselves
        assert torch.allclose(out[~off], expected[~off])

    def test_smoothing_does_not_change_the_weight(self, case):
        s, weight = case
        before = weight.clone()

        def overwriting(x: torch.Tensor) -> torch.Tensor:
            return smooth(x, 0.2, 3, inplace=True)

        Support(weight).smoothing(overwriting)
        assert torch.equal(weight, before)


def shifted_pair(shift=(1, 0, 2), size=24, margin=4):
    """Fixed and moving features with ``moving(x + shift) = fixed(x)``."""
    big = smooth_features((size + 2 * margin,) * 3)
    f = big[..., margin:-margin, margin:-margin, margin:-margin]
    i, j, k = (margin - s for s in shift)
    m = big[..., i : i + size, j : j + size, k : k + size].clone()
    return f, m


class TestSolverWithMasks:
    @pytest.mark.parametrize("backend", ["torch", "auto"])
    def test_without_masks_is_published(self, backend):
        f, m = shifted_pair(size=16)
        solver = VoxelOpt(levels=2, backend=backend)
        plain = solver.solve(f, m)
        keywords = solver.solve(f, m, fixed_mask=None, moving_mask=None)
        assert torch.equal(plain.displacement, keywords.displacement)
        assert torch.equal(plain.entropy, keywords.entropy)
        assert plain.displacement.abs().amax() > 0.5  # a field was found

    @pytest.mark.parametrize("levels", [2, 3])
    def test_garbage_slab_takes_the_shift_from_its_neighbours(self, levels):
        """Moving features are noise in a slab; marked as no data there, the field in the slab
        follows the true shift of the rest; unmarked, the noise pulls it far off.

        Measured (mean / max error in the slab, voxels): masked 1.16 / 2.2 (levels 2) and
        0.60 / 2.7 (levels 3), unmasked 2.97 and 2.64. Before the mask pyramids were dilated
        (so that a sliver without data on a face no longer empties a coarse face: clinical
        fields of view, see voxelopt.pyramid) the masked error was 0.26 / 0.4; that is the
        price of the dilation on a slab inside the volume."""
        shift = (1, 0, 2)
        f, m = shifted_pair(shift)
        lo, hi = 10, 15
        g = torch.Generator().manual_seed(5)
        m[..., lo:hi] = 2 * torch.rand(1, 4, 24, 24, hi - lo, generator=g)
        moving_mask = torch.ones(1, 1, 24, 24, 24)
        moving_mask[..., lo:hi] = 0
        solver = VoxelOpt(levels=levels)
        true = torch.tensor(shift, dtype=f.dtype).view(1, 3, 1, 1, 1)
        slab = (..., slice(4, -4), slice(4, -4), slice(lo - shift[2], hi - shift[2]))
        masked = (solver(f, m, moving_mask=moving_mask) - true)[slab].norm(dim=1)
        unmasked = (solver(f, m) - true)[slab].norm(dim=1)
        assert masked.mean() < 0.5 * unmasked.mean() and masked.mean() < 1.3
        assert unmasked.mean() > 2.0

    def test_no_informative_voxel_gives_zero_field(self):
        f, m = shifted_pair(size=16)
        u = VoxelOpt(levels=2)(f, m, fixed_mask=torch.zeros(1, 1, 16, 16, 16))
        assert torch.isfinite(u).all() and u.eq(0).all()

    def test_backends_agree(self):
        pytest.importorskip("numba", reason="numba is not installed")
        g = torch.Generator().manual_seed(0)
        f = torch.rand(2, 3, 14, 11, 17, generator=g)
        m = torch.roll(f, shifts=(1, -1, 2), dims=(2, 3, 4))
        fixed_mask = random_mask((2, 1, 14, 11, 17), keep=0.9, seed=7)
        moving_mask = torch.ones(1, 1, 14, 11, 17)
        moving_mask[..., 12:] = 0  # a field of view that ends early, shared by the batch
        results = {}
        for backend in ("numba", "torch"):
            solver = VoxelOpt(levels=2, backend=backend)
            with torch.inference_mode():
                results[backend] = solver.solve(
                    f, m, fixed_mask=fixed_mask, moving_mask=moving_mask
                )
        ours, theirs = results["numba"], results["torch"]
        # the tolerance rule of tests/kernels/test_solver_backends.py: float rounding of the
        # entropy decides a few near-tied argmins; everything else agrees to rounding
        inner = (ours.displacement - theirs.displacement)[..., 3:-3, 3:-3, 3:-3].abs()
        assert inner.median() <= 1e-5 and inner.mean() <= 1e-2
        assert (ours.entropy - theirs.entropy).abs().median() <= 1e-5
        assert not torch.equal(
            ours.displacement, VoxelOpt(levels=2, backend="numba")(f, m)
        )  # the masks changed something

    def _soft_solver(self):
        return VoxelOpt(
            levels=1, argmin="soft", temperature=0.5, gammas=(0.1, 1.0), integration_steps=2
        )

    def _masks(self, shape):
        fixed_mask = torch.ones(1, 1, *shape, dtype=torch.float64)
        fixed_mask[0, 0, 1, 1:3, 2] = 0
        moving_mask = torch.ones(1, 1, *shape, dtype=torch.float64)
        moving_mask[..., -1] = 0
        return fixed_mask, moving_mask

    def test_gradcheck_soft(self):
        torch.manual_seed(0)
        shape = (5, 5, 5)
        f = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
        m = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
        fixed_mask, moving_mask = self._masks(shape)
        solver = self._soft_solver()

        def fn(f, m):
            return solver(f, m, fixed_mask=fixed_mask, moving_mask=moving_mask)

        assert torch.autograd.gradcheck(fn, (f, m), atol=1e-5, fast_mode=True)

    def test_uninformative_features_get_no_gradient(self):
        """With one level nothing is warped: a fixed voxel outside its mask, and a moving voxel
        outside its mask (each cost entry that reads it is flattened), do not reach the field."""
        torch.manual_seed(1)
        shape = (6, 6, 6)
        f = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
        m = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
        fixed_mask, moving_mask = self._masks(shape)
        u = self._soft_solver()(f, m, fixed_mask=fixed_mask, moving_mask=moving_mask)
        u.square().sum().backward()
        fixed_off = (fixed_mask == 0).expand_as(f)
        moving_off = (moving_mask == 0).expand_as(m)
        assert f.grad[fixed_off].eq(0).all() and m.grad[moving_off].eq(0).all()
        assert f.grad[~fixed_off].abs().sum() > 0 and m.grad[~moving_off].abs().sum() > 0


class TestSolverMasks:
    """:meth:`VoxelOptRegistration.solver_masks`: image-grid masks eroded by the extractor's
    reach and resized to the solver's grid."""

    @pytest.mark.parametrize("extractor, reach", [("raw", 0), ("mind", 3)])
    def test_against_reference(self, extractor, reach):
        model = VoxelOptRegistration(extractor)
        assert model.extractor.context_voxels == reach
        fixed = random_mask((1, 1, 8, 7, 9), keep=0.97, seed=11)
        moving = torch.ones(1, 1, 8, 7, 9)
        moving[..., 6:] = 0  # a field of view that ends early
        moving[0, 0, 0, 0, 0] = 0.5  # counts as data
        shape = (4, 4, 5)
        out = model.solver_masks(fixed, moving, shape)
        assert set(out) == {"fixed_mask", "moving_mask"}
        for name, mask in (("fixed_mask", fixed), ("moving_mask", moving)):
            expected = F.interpolate(
                reference_erode(mask, reach), size=shape, mode="trilinear", align_corners=True
            )
            assert out[name].shape == (1, 1, *shape)
            assert torch.allclose(out[name], expected, rtol=0, atol=1e-6)
        # the moving field of view ends 3 voxels earlier with MIND, where it ended without
        eroded = reference_erode(moving, reach)
        assert eroded[..., : 6 - reach].eq(1).all() and eroded[..., 6 - reach :].eq(0).all()

    def test_only_given_masks(self):
        model = VoxelOptRegistration("raw")
        assert model.solver_masks(None, None, (3, 3, 3)) == {}
        out = model.solver_masks(None, torch.ones(1, 1, 4, 4, 4, dtype=torch.bool), (4, 4, 4))
        assert list(out) == ["moving_mask"] and out["moving_mask"].dtype == torch.float32
        assert out["moving_mask"].eq(1).all()

    @pytest.mark.parametrize("bad", [np.ones((1, 1, 4, 4, 4)), torch.ones(4, 4, 4)])
    def test_bad_mask(self, bad):
        with pytest.raises(ValueError, match="moving_mask must be"):
            VoxelOptRegistration("raw").solver_masks(None, bad, (4, 4, 4))


class TestUserMasks:
    """User masks through :func:`register_volumes` on a small phantom (working grid = image
    grid, 40 x 32 x 44 at 7.5 mm); field_of_view=False so that only the user's mask counts."""

    SPACING, SHAPE = 7.5, (40, 32, 44)

    @pytest.fixture(scope="class")
    def pair(self):
        fixed, _ = make_phantom(self.SHAPE, self.SPACING, seed=0)
        moving, _ = make_phantom(self.SHAPE, self.SPACING, seed=1)
        return volume_from_array(fixed, self.SPACING), volume_from_array(moving, self.SPACING)

    def _register(self, pair, **masks):
        return register_volumes(
            *pair,
            config=VoxelOptConfig(levels=3),
            spacing=self.SPACING,
            field_of_view=False,
            **masks,
        )

    def test_slab_mask_changes_the_field_there(self, pair):
        plain = self._register(pair)
        mask = np.ones(self.SHAPE, dtype=np.float32)
        mask[..., 18:26] = 0
        masked = self._register(pair, moving_mask=volume_from_array(mask, self.SPACING))
        assert plain.coverage == {"fixed": 1.0, "moving": 1.0}
        assert masked.coverage["fixed"] == 1.0
        assert masked.coverage["moving"] == pytest.approx(1 - 8 / 44)
        change = (masked.displacement_working - plain.displacement_working).norm(dim=1)[0]
        slab = change[..., 18:26].mean()
        far = torch.cat([change[..., :4], change[..., -4:]], dim=-1).mean()
        assert slab > 1.0 and slab > 3 * far  # voxels, mostly where the mask excludes data

    @pytest.mark.parametrize("name", ["fixed_mask", "moving_mask"])
    def test_empty_mask_raises(self, pair, name):
        empty = volume_from_array(np.zeros(self.SHAPE, dtype=np.float32), self.SPACING)
        with pytest.raises(ValueError, match=f"{name} is empty"):
            self._register(pair, **{name: empty})

    @pytest.mark.parametrize("name", ["fixed_mask", "moving_mask"])
    def test_mask_on_another_grid_raises(self, pair, name):
        other = volume_from_array(np.ones(self.SHAPE, dtype=np.float32), 2 * self.SPACING)
        with pytest.raises(ValueError, match=name):
            self._register(pair, **{name: other})
        with pytest.raises(TypeError, match=name):
            self._register(pair, **{name: np.ones(self.SHAPE)})
