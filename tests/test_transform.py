"""Tests of voxelopt.transform against plain references (slicing, scipy map_coordinates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxelopt.transform import (
    check_displacement,
    compose,
    grid_sample_3d,
    identity_grid,
    integrate_velocity,
    pyramid_shapes,
    resize_displacement,
    resize_volume,
    warp,
)

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _smooth_field(shape, amplitude, seed, dtype=torch.float64, batch=1):
    """Gaussian-smoothed noise scaled to a largest component of ``amplitude`` voxels."""
    rng = np.random.default_rng(seed)
    f = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) for _ in range(3 * batch)]
    )
    f = torch.from_numpy(f).reshape(batch, 3, *shape)
    return (f / f.abs().max() * amplitude).to(dtype)


def _linear_field(shape, matrix, offset, dtype=torch.float64):
    """``u(x) = A x + b`` in voxels, ``(1, 3, D, H, W)``."""
    grid = identity_grid(shape, dtype=dtype)[0]
    a = torch.as_tensor(matrix, dtype=dtype)
    b = torch.as_tensor(offset, dtype=dtype).view(3, 1, 1, 1)
    return (torch.einsum("ij,jdhw->idhw", a, grid) + b)[None]


@pytest.fixture
def threads(request):
    """Run the test with ``request.param`` intra-op threads, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# ------------------------------------------------------------------------ grid_sample_3d
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("shape", [(6, 5, 4), (3, 5, 7), (1, 1, 1)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_grid_sample_3d_matches_grid_sample(threads, shape, mode, padding_mode):
    # B = 1 is cut into one piece per thread (when the voxel count allows): the result must
    # be exactly F.grid_sample's, voxel order included.
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 2, *shape, generator=g)
    grid = torch.rand(1, *shape, 3, generator=g) * 2.4 - 1.2  # some points outside
    ref = torch.nn.functional.grid_sample(
        image, grid, mode=mode, padding_mode=padding_mode, align_corners=True
    )
    out = grid_sample_3d(image, grid, mode, padding_mode)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_grid_sample_3d_batch_and_gradcheck(threads):
    image = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(2, 3, 4, 4, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    ref = torch.nn.functional.grid_sample(image, grid, align_corners=True)
    assert torch.equal(grid_sample_3d(image, grid, "bilinear", "zeros"), ref)
    single = (image[:1].detach().requires_grad_(), grid[:1].detach().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda i, x: grid_sample_3d(i, x, "bilinear", "border"), single, eps=1e-6, atol=1e-5
    )


# ---------------------------------------------------------------------------- identity grid
def test_identity_grid(dtype):
    g = identity_grid((2, 3, 4), dtype=dtype)
    assert g.shape == (1, 3, 2, 3, 4) and g.dtype == dtype
    assert g[0, 0, 1, 2, 3] == 1 and g[0, 1, 1, 2, 3] == 2 and g[0, 2, 1, 2, 3] == 3
    with pytest.raises(ValueError, match="shape"):
        identity_grid((2, 3))


# -------------------------------------------------------------------------------------- warp
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_zero_is_identity(dtype, mode):
    img = torch.randn(2, 3, 5, 6, 7, dtype=dtype)
    out = warp(img, torch.zeros(2, 3, 5, 6, 7, dtype=dtype), mode=mode)
    assert out.shape == img.shape and out.dtype == dtype
    assert torch.allclose(out, img, atol=TOL[dtype])


def test_warp_zero_labels_exact():
    labels = torch.randint(0, 14, (1, 1, 6, 5, 4))
    out = warp(labels, torch.zeros(1, 3, 6, 5, 4), mode="nearest")
    assert out.dtype == labels.dtype and torch.equal(out, labels)


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (2, -1, 1)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_integer_translation_is_a_slice(dtype, shift, mode):
    """``out(x) = img(x + t)``: a shifted slice, zeros where ``x + t`` leaves the grid."""
    shape = (6, 7, 8)
    img = torch.randn(1, 2, *shape, dtype=dtype)
    disp = torch.tensor(shift, dtype=dtype).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    out = warp(img, disp.contiguous(), mode=mode)
    ref = torch.zeros_like(img)
    dst, src = [], []
    for n, t in zip(shape, shift, strict=True):
        dst.append(slice(max(0, -t), min(n, n - t)))
        src.append(slice(max(0, t), min(n, n + t)))
    ref[(..., *dst)] = img[(..., *src)]
    assert torch.allclose(out, ref, atol=TOL[dtype])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warp_matches_map_coordinates(dtype, seed):
    """Trilinear warp == scipy map_coordinates(order=1) at x + u(x), zeros outside."""
    rng = np.random.default_rng(seed)
    shape = (7, 8, 9)
    img = rng.standard_normal(shape)
    disp = rng.standard_normal((3, *shape)) * 1.2
    out = warp(torch.from_numpy(img).to(dtype)[None, None], torch.from_numpy(disp).to(dtype)[None])[
        0, 0
    ].double()
    coords = np.indices(shape) + disp
    # grid-constant: zero beyond the edges but still interpolated there (grid_sample "zeros")
    ref = ndimage.map_coordinates(img, coords, order=1, mode="grid-constant", cval=0.0)
    assert np.allclose(out.numpy(), ref, atol=10 * TOL[dtype])
    inside = np.all((coords >= 0) & (coords <= np.array(shape).reshape(3, 1, 1, 1) - 1), axis=0)
    assert inside.mean() > 0.3
    ref_inside = ndimage.map_coordinates(img, coords, order=1, mode="nearest")
    assert np.allclose(out.numpy()[inside], ref_inside[inside], atol=10 * TOL[dtype])


@pytest.mark.parametrize("padding_mode", ["border", "reflection"])
def test_warp_padding_modes_inside_agree(padding_mode):
    shape = (6, 6, 6)
    img = torch.randn(1, 1, *shape, dtype=torch.float64)
    disp = _smooth_field(shape, 0.8, 3)
    a = warp(img, disp, padding_mode="zeros")
    b = warp(img, disp, padding_mode=padding_mode)
    inside = (
        (identity_grid(shape, dtype=torch.float64) + disp >= 0)
        & (identity_grid(shape, dtype=torch.float64) + disp <= 5)
    ).all(1, keepdim=True)
    assert torch.allclose(a[inside], b[inside])


def test_warp_batch_broadcast_and_mixed_dtypes():
    img = torch.randn(1, 2, 4, 5, 6)
    disp = _smooth_field((4, 5, 6), 1.0, 0, batch=3)
    out = warp(img, disp)  # float32 image, float64 field
    assert out.shape == (3, 2, 4, 5, 6) and out.dtype == torch.float32
    for k in range(3):
        assert torch.allclose(out[k : k + 1], warp(img, disp[k : k + 1]))


def test_warp_gradcheck():
    img = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    # fractional offsets away from integer coordinates (trilinear kinks)
    disp = (torch.rand(1, 3, 4, 4, 4, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(warp, (img, disp), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(
        lambda i, d: warp(i, d, padding_mode="border"), (img, disp), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize(
    "img_shape, disp_shape, match",
    [
        ((1, 1, 4, 4, 4), (1, 2, 4, 4, 4), r"\(B, 3, D, H, W\)"),
        ((1, 1, 4, 4, 4), (3, 4, 4, 4), r"\(B, 3, D, H, W\)"),
        ((1, 4, 4, 4), (1, 3, 4, 4, 4), "image must have shape"),
        ((1, 1, 4, 4, 5), (1, 3, 4, 4, 4), "does not match"),
        ((2, 1, 4, 4, 4), (3, 3, 4, 4, 4), "batch sizes differ"),
    ],
)
def test_warp_shape_errors(img_shape, disp_shape, match):
    with pytest.raises(ValueError, match=match):
        warp(torch.zeros(img_shape), torch.zeros(disp_shape))


def test_warp_type_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        warp(torch.zeros(1, 1, 4, 4, 4), np.zeros((1, 3, 4, 4, 4)))
    with pytest.raises(ValueError, match="floating"):
        check_displacement(torch.zeros(1, 3, 4, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------- scaling & squaring
@pytest.mark.parametrize("steps", [0, 1, 7])
def test_integrate_constant_velocity_is_translation(dtype, steps):
    t = torch.tensor([1.5, -0.75, 2.0], dtype=dtype).view(1, 3, 1, 1, 1)
    v = t.expand(2, 3, 5, 6, 7).contiguous()
    phi = integrate_velocity(v, steps=steps)
    assert phi.shape == v.shape
    assert torch.allclose(phi, v, atol=TOL[dtype] * 10)


def test_integrate_matches_euler_flow():
    """A smooth velocity: scaling and squaring ~ many small Euler steps of the same flow."""
    shape = (10, 10, 10)
    v = _smooth_field(shape, 1.5, 4)
    phi = integrate_velocity(v, steps=7)
    euler = torch.zeros_like(v)
    n = 256
    for _ in range(n):  # x_{k+1} = x_k + v(x_k) / n, tracked as a displacement
        euler = euler + warp(v, euler, padding_mode="border") / n
    interior = (slice(None), slice(None), *[slice(2, -2)] * 3)
    assert (phi - euler)[interior].abs().max() < 0.02
    assert not torch.allclose(phi, v, atol=0.05)  # integration is not the identity map


def test_integrate_errors():
    with pytest.raises(ValueError, match="steps"):
        integrate_velocity(torch.zeros(1, 3, 4, 4, 4), steps=-1)
    with pytest.raises(ValueError, match="velocity"):
        integrate_velocity(torch.zeros(1, 2, 4, 4, 4))


# ------------------------------------------------------------------------------ composition
def test_compose_matches_reference():
    """compose(a, b)(x) == a(x) + b(x + a(x)), b sampled by scipy (border = nearest)."""
    shape = (8, 9, 10)
    first = _smooth_field(shape, 2.0, 1)
    second = _smooth_field(shape, 2.0, 2)
    got = compose(first, second)
    coords = np.indices(shape) + first[0].numpy()
    ref = first[0].numpy() + np.stack(
        [
            ndimage.map_coordinates(second[0, i].numpy(), coords, order=1, mode="nearest")
            for i in range(3)
        ]
    )
    assert np.allclose(got[0].numpy(), ref, atol=1e-10)


def test_compose_matches_sequential_warps():
    """With a linear image trilinear warps are exact, so in the interior (where every sample
    stays on the grid) warping twice equals warping once by the composition."""
    shape = (16, 16, 16)
    grid = identity_grid(shape, dtype=torch.float64)
    img = (grid[:, :1] + 2.0 * grid[:, 1:2] - grid[:, 2:]) / 16.0
    first = _smooth_field(shape, 2.0, 1)
    second = _smooth_field(shape, 2.0, 2)
    sequential = warp(warp(img, second), first)
    composed = warp(img, compose(first, second))
    interior = (slice(None), slice(None), *[slice(4, -4)] * 3)
    err = (sequential - composed)[interior].abs().max()
    naive = (sequential - warp(img, first + second))[interior].abs().max()
    assert err < 1e-10
    assert naive > 1e-3  # adding the fields instead of composing them is measurably wrong
    # a smooth random image: equal up to the blur of interpolating twice
    rng = np.random.default_rng(0)
    smooth = torch.from_numpy(ndimage.gaussian_filter(rng.standard_normal(shape), 3.0))
    smooth = (smooth / smooth.abs().max())[None, None]
    seq2 = warp(warp(smooth, second), first)
    motion = (seq2 - smooth)[interior].abs().max()
    assert (seq2 - warp(smooth, compose(first, second)))[interior].abs().max() < 0.2 * motion


def test_compose_of_linear_maps_exact():
    """Affine fields: composition is exact (trilinear reproduces linear functions)."""
    shape = (8, 8, 8)
    a1, b1 = [[0.05, 0.0, 0.02], [0.0, -0.04, 0.0], [0.01, 0.0, 0.03]], [0.3, -0.2, 0.1]
    a2, b2 = [[-0.03, 0.02, 0.0], [0.0, 0.05, 0.01], [0.0, 0.0, -0.02]], [-0.1, 0.2, 0.3]
    first, second = _linear_field(shape, a1, b1), _linear_field(shape, a2, b2)
    # x + u(x) = (I + A1) x + b1, then y + (A2 y + b2)
    m1 = torch.eye(3, dtype=torch.float64) + torch.tensor(a1, dtype=torch.float64)
    m2 = torch.eye(3, dtype=torch.float64) + torch.tensor(a2, dtype=torch.float64)
    total_a = m2 @ m1 - torch.eye(3, dtype=torch.float64)
    total_b = m2 @ torch.tensor(b1, dtype=torch.float64) + torch.tensor(b2, dtype=torch.float64)
    expected = _linear_field(shape, total_a, total_b)
    got = compose(first, second)
    interior = (slice(None), slice(None), *[slice(1, -1)] * 3)
    assert torch.allclose(got[interior], expected[interior], atol=1e-9)


def test_compose_with_zero(dtype):
    u = _smooth_field((6, 6, 6), 1.0, 5, dtype=dtype)
    zero = torch.zeros_like(u)
    assert torch.allclose(compose(zero, u), u, atol=TOL[dtype])
    assert torch.allclose(compose(u, zero), u, atol=TOL[dtype])
    with pytest.raises(ValueError, match="second"):
        compose(u, zero[:, :2])


# --------------------------------------------------------------------------------- resizing
@pytest.mark.parametrize(
    "old, new", [((9, 9, 9), (5, 5, 5)), ((5, 7, 9), (9, 13, 17)), ((8, 6, 10), (4, 3, 5))]
)
def test_resize_displacement_constant_field_keeps_physical_meaning(dtype, old, new):
    t = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    disp = t.view(1, 3, 1, 1, 1).expand(1, 3, *old).contiguous()
    out = resize_displacement(disp, new)
    assert out.shape == (1, 3, *new)
    factor = torch.tensor([(n - 1) / (o - 1) for n, o in zip(new, old, strict=True)], dtype=dtype)
    assert torch.allclose(out, (t * factor).view(1, 3, 1, 1, 1).expand_as(out), atol=TOL[dtype])
    # physical size (field of view / (n-1) per voxel) is the same before and after
    fov = 100.0
    mm_old = t * torch.tensor([fov / (o - 1) for o in old], dtype=dtype)
    mm_new = out[0, :, 0, 0, 0] * torch.tensor([fov / (n - 1) for n in new], dtype=dtype)
    assert torch.allclose(mm_old, mm_new, atol=TOL[dtype] * fov)


def test_resize_displacement_linear_map_consistent():
    """x -> x + u(x) on the old grid and y -> y + u'(y) on the new grid name the same points."""
    old, new = (9, 9, 9), (5, 5, 5)
    a = [[0.1, 0.0, 0.05], [0.0, -0.1, 0.0], [0.02, 0.0, 0.1]]
    disp = _linear_field(old, a, [0.5, 0.2, -0.3])
    out = resize_displacement(disp, new)
    scale = torch.tensor(
        [(n - 1) / (o - 1) for n, o in zip(new, old, strict=True)], dtype=torch.float64
    ).view(1, 3, 1, 1, 1)
    y = identity_grid(new, dtype=torch.float64)
    x = y / scale
    expected_old = x + _linear_field_at(x, a, [0.5, 0.2, -0.3])
    assert torch.allclose(y + out, expected_old * scale, atol=1e-9)


def _linear_field_at(points, matrix, offset):
    a = torch.as_tensor(matrix, dtype=points.dtype)
    b = torch.as_tensor(offset, dtype=points.dtype).view(1, 3, 1, 1, 1)
    return torch.einsum("ij,bjdhw->bidhw", a, points) + b


def test_resize_volume_same_size_and_trilinear_corners():
    vol = torch.randn(1, 2, 5, 5, 5)
    assert resize_volume(vol, (5, 5, 5)) is vol
    big = resize_volume(vol, (9, 9, 9))
    assert torch.allclose(big[..., ::2, ::2, ::2], vol, atol=1e-6)  # corners aligned


def test_resize_volume_nearest_is_corner_aligned():
    labels = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(1, 1, 9, 2, 2).contiguous()
    out = resize_volume(labels, (5, 2, 2), mode="nearest")
    assert out[0, 0, :, 0, 0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


@pytest.mark.parametrize(
    "shape, levels, expected",
    [
        ((96, 80, 128), 3, [(96, 80, 128), (48, 40, 64), (24, 20, 32)]),
        ((9, 5, 4), 3, [(9, 5, 4), (5, 3, 2), (3, 2, 1)]),
        ((7, 7, 7), 1, [(7, 7, 7)]),
    ],
)
def test_pyramid_shapes(shape, levels, expected):
    assert pyramid_shapes(shape, levels) == expected
