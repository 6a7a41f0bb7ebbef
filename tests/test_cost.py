"""Cost volume: smoke, exceptions, loop reference, gradcheck."""

from __future__ import annotations

import itertools

import pytest
import torch

from voxelopt.cost import cost_volume, search_offsets


def reference_cost(fixed: torch.Tensor, moving: torch.Tensor, k: int) -> torch.Tensor:
    """Plain loops: C(x, o) = mean_c |F(x) - M(x + o)|, zero outside the moving volume."""
    b, c, d, h, w = fixed.shape
    offsets = search_offsets(k).long().tolist()
    out = torch.zeros(b, len(offsets), d, h, w, dtype=fixed.dtype)
    for n, (i, j, l) in enumerate(offsets):
        for x, y, z in itertools.product(range(d), range(h), range(w)):
            xx, yy, zz = x + i, y + j, z + l
            if 0 <= xx < d and 0 <= yy < h and 0 <= zz < w:
                m = moving[:, :, xx, yy, zz]
            else:
                m = torch.zeros(b, c, dtype=fixed.dtype)
            out[:, n, x, y, z] = (fixed[:, :, x, y, z] - m).abs().mean(1)
    return out


class TestSearchOffsets:
    @pytest.mark.parametrize("k", [1, 2, 3])
    def test_cardinality(self, k):
        o = search_offsets(k)
        assert o.shape == ((2 * k + 1) ** 3, 3)
        assert len({tuple(r) for r in o.long().tolist()}) == o.shape[0]
        assert o.abs().max() == k

    def test_zero_offset_first(self):
        assert search_offsets(1)[0].tolist() == [0, 0, 0]

    @pytest.mark.parametrize("k", [0, -1, 1.5])
    def test_invalid(self, k):
        with pytest.raises(ValueError, match="kernel_size"):
            search_offsets(k)


class TestCostVolume:
    @pytest.mark.parametrize("batch", [1, 2])
    @pytest.mark.parametrize("k", [1, 2])
    def test_smoke_shape(self, batch, k, dtype):
        f = torch.rand(batch, 3, 5, 6, 7, dtype=dtype)
        c = cost_volume(f, torch.rand_like(f), k)
        assert c.shape == (batch, (2 * k + 1) ** 3, 5, 6, 7)
        assert c.dtype == dtype

    @pytest.mark.parametrize("k", [1, 2])
    @pytest.mark.parametrize("shape", [(4, 5, 6), (3, 3, 3), (2, 7, 4)])
    @pytest.mark.parametrize("channels", [1, 3])
    def test_against_loops(self, k, shape, channels):
        f = torch.rand(2, channels, *shape, dtype=torch.float64)
        m = torch.rand_like(f)
        torch.testing.assert_close(cost_volume(f, m, k), reference_cost(f, m, k))

    def test_autograd_path_matches_fast_path(self):
        f = torch.rand(2, 2, 4, 5, 6, dtype=torch.float64)
        m = torch.rand_like(f)
        fast = cost_volume(f, m)
        slow = cost_volume(f.clone().requires_grad_(), m)
        assert slow.requires_grad
        torch.testing.assert_close(slow.detach(), fast)

    def test_identical_inputs_zero_cost_at_zero_offset(self):
        f = torch.rand(1, 4, 6, 6, 6)
        assert cost_volume(f, f)[:, 0].abs().max() == 0

    def test_shift_found(self):
        f = torch.rand(1, 2, 8, 8, 8)
        m = torch.roll(f, shifts=(1, -1, 0), dims=(2, 3, 4))  # M(x + o) = F(x) for o=(1,-1,0)
        c = cost_volume(f, m)
        best = search_offsets(1)[c[:, :, 2:-2, 2:-2, 2:-2].argmin(1)]
        assert (best == torch.tensor([1.0, -1.0, 0.0])).all()

    def test_gradcheck(self):
        f = torch.rand(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        m = torch.rand(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: cost_volume(a, b, 1), (f, m))

    @pytest.mark.parametrize(
        "fixed_shape, moving_shape, match",
        [
            ((1, 2, 4, 4, 4), (1, 2, 4, 4, 5), "differ"),
            ((1, 2, 4, 4), (1, 2, 4, 4), r"\(B, C, D, H, W\)"),
            ((1, 2, 4, 4, 4), (1, 3, 4, 4, 4), "differ"),
        ],
    )
    def test_exceptions(self, fixed_shape, moving_shape, match):
        with pytest.raises(ValueError, match=match):
            cost_volume(torch.rand(fixed_shape), torch.rand(moving_shape))

    def test_device(self, device):
        f = torch.rand(1, 2, 4, 4, 4, device=device)
        assert cost_volume(f, f).device.type == device.type
