"""Tests of voxelopt.metrics: each metric against a plain reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxelopt.metrics import (
    RegistrationMetrics,
    dice,
    dice_per_label,
    endpoint_error,
    hd95,
    jacobian_determinant,
    mean_over_labels,
    nonpositive_jacobian_fraction,
    sdlogj,
)


def _blobs(shape, seed, n_labels=3):
    """Random smooth label blobs (labels 1..n_labels) for tests."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.int64)
    for lab in range(1, n_labels + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
        out[(field > 0.15) & (out == 0)] = lab
    return out


# ------------------------------------------------------------------------------------- Dice
def _dice_reference(a, b, lab):
    inter = sum(1 for x, y in zip(a.ravel(), b.ravel(), strict=True) if x == lab and y == lab)
    na = sum(1 for x in a.ravel() if x == lab)
    nb = sum(1 for y in b.ravel() if y == lab)
    return 2 * inter / (na + nb)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_reference(seed):
    a, b = _blobs((8, 9, 10), seed), _blobs((8, 9, 10), seed + 10)
    got = dice(a, b)
    assert set(got) == set(np.union1d(np.unique(a), np.unique(b))) - {0}
    for lab, value in got.items():
        assert value == pytest.approx(_dice_reference(a, b, lab))


_WIDE = [np.uint16, np.uint32, np.uint64, np.int16, np.int32, np.float32]


# offset 290: labels beyond the joint histogram's range (a fallback path)
@pytest.mark.parametrize(
    "dtype, offset",
    [(t, 0) for t in [np.uint8, np.int8, *_WIDE]] + [(t, 290) for t in _WIDE],
)
def test_dice_label_dtypes(dtype, offset):
    a, b = _blobs((8, 9, 10), 4), _blobs((8, 9, 10), 5)
    a, b = (np.where(x > 0, x + offset, 0).astype(dtype) for x in (a, b))
    got = dice(a, b)
    assert set(got) == {offset + 1, offset + 2, offset + 3}
    for lab, value in got.items():
        assert value == pytest.approx(_dice_reference(a, b, lab))


def test_dice_smoke_identical_and_disjoint():
    a = np.zeros((6, 6, 6), dtype=np.int64)
    a[:3] = 1
    b = np.zeros_like(a)
    b[3:] = 1
    assert dice(a, a) == {1: 1.0}
    assert dice(a, b) == {1: 0.0}
    assert dice(torch.from_numpy(a), torch.from_numpy(a)) == {1: 1.0}


def test_dice_absent_labels_left_out():
    a = np.zeros((4, 4, 4), dtype=np.int64)
    a[0] = 1
    b = a.copy()
    b[3] = 2  # label 2 only in b -> 0; label 7 in neither -> left out
    got = dice(a, b, labels=[1, 2, 7])
    assert got == {1: 1.0, 2: 0.0}
    assert mean_over_labels(got) == pytest.approx(0.5)
    assert math.isnan(mean_over_labels({}))


def test_dice_errors():
    a = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 4, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        dice(a + 0.5, a)
    with pytest.raises(TypeError, match="pred_labels"):
        dice([[0]], a)


def test_dice_per_label_matches_dice():
    a = torch.from_numpy(np.stack([_blobs((8, 8, 8), s) for s in (0, 1)]))[:, None]
    b = torch.from_numpy(np.stack([_blobs((8, 8, 8), s) for s in (5, 6)]))[:, None]
    labels = [1, 2, 3, 9]
    got = dice_per_label(a, b, labels)
    assert got.shape == (2, 4)
    for k in range(2):
        ref = dice(a[k], b[k], labels)
        for j, lab in enumerate(labels):
            if lab in ref:
                assert got[k, j].item() == pytest.approx(ref[lab])
            else:
                assert torch.isnan(got[k, j])
    assert torch.allclose(mean_over_labels(got), got.nanmean(-1), equal_nan=True)


def test_dice_per_label_errors():
    a = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(a, a[..., :3], [1])
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        dice_per_label(a[0, 0, 0], a[0, 0, 0], [1])
    with pytest.raises(TypeError):
        dice_per_label(a.numpy(), a, [1])


# ------------------------------------------------------------------------------------- HD95
def _surface_points(mask):
    """Brute force: a voxel is on the surface if a face neighbour is outside (or off-grid)."""
    padded = np.pad(mask, 1)
    pts = []
    for i, j, k in zip(*np.nonzero(mask), strict=True):
        i1, j1, k1 = i + 1, j + 1, k + 1
        neigh = [
            padded[i1 - 1, j1, k1],
            padded[i1 + 1, j1, k1],
            padded[i1, j1 - 1, k1],
            padded[i1, j1 + 1, k1],
            padded[i1, j1, k1 - 1],
            padded[i1, j1, k1 + 1],
        ]
        if not all(neigh):
            pts.append((i, j, k))
    return np.array(pts, dtype=np.float64)


def _hd95_reference(a, b, spacing):
    pa = _surface_points(a) * np.asarray(spacing)
    pb = _surface_points(b) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("spacing", [1.0, (2.0, 1.0, 3.0), (0.7, 0.7, 2.5)])
@pytest.mark.parametrize("seed", [0, 3])
def test_hd95_matches_bruteforce(spacing, seed):
    a, b = _blobs((9, 10, 8), seed), _blobs((9, 10, 8), seed + 1)
    got = hd95(a, b, spacing)
    sp = (spacing,) * 3 if isinstance(spacing, float) else spacing
    for lab in got:
        ref = _hd95_reference(a == lab, b == lab, sp)
        assert got[lab] == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_hd95_shifted_cube():
    a = np.zeros((12, 12, 12), dtype=np.int64)
    a[3:7, 3:7, 3:7] = 1
    b = np.roll(a, 2, axis=0)
    assert hd95(a, a, 1.5) == {1: 0.0}
    assert hd95(a, b, (1.5, 1.0, 1.0))[1] == pytest.approx(3.0)  # 2 voxels * 1.5 mm


def test_hd95_missing_label():
    a = np.zeros((6, 6, 6), dtype=np.int64)
    a[1:3, 1:3, 1:3] = 1
    b = np.zeros_like(a)
    b[1:3, 1:3, 1:3] = 1
    b[4:, 4:, 4:] = 2
    got = hd95(a, b, 1.0, labels=[1, 2, 3])
    assert set(got) == {1, 2}  # 3 is in neither image
    assert math.isnan(got[2])
    assert mean_over_labels(got) == 0.0


def test_hd95_errors():
    a = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, -1.0)
    with pytest.raises(ValueError, match="D, H, W"):
        hd95(a[0], a[0], 1.0)


# -------------------------------------------------------------------------------- Jacobian
def _jacobian_reference(u):
    """numpy: np.gradient (central inside, one-sided at the edges), det per voxel."""
    u = u.numpy()
    grads = [np.gradient(u[i], axis=(0, 1, 2)) for i in range(3)]
    jac = np.empty(u.shape[1:] + (3, 3))
    for i in range(3):
        for j in range(3):
            jac[..., i, j] = grads[i][j] + (i == j)
    return np.linalg.det(jac)


def test_jacobian_identity_and_linear(dtype):
    zero = torch.zeros(2, 3, 5, 6, 7, dtype=dtype)
    assert torch.allclose(jacobian_determinant(zero), torch.ones(2, 5, 6, 7, dtype=dtype))
    a = torch.tensor([[0.1, 0.2, 0.0], [-0.1, 0.3, 0.05], [0.0, 0.1, -0.2]], dtype=dtype)
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in (5, 6, 7)], indexing="ij")
    )
    u = torch.einsum("ij,jdhw->idhw", a, grid)[None]
    expected = torch.det(torch.eye(3, dtype=dtype) + a)
    assert torch.allclose(jacobian_determinant(u), expected.expand(1, 5, 6, 7), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_jacobian_matches_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 3, 6, 7, 5, generator=g, dtype=torch.float64) * 0.3
    assert np.allclose(jacobian_determinant(u)[0].numpy(), _jacobian_reference(u[0]))


def test_jacobian_gradcheck():
    u = (torch.randn(1, 3, 4, 4, 4, dtype=torch.float64) * 0.1).requires_grad_()
    assert torch.autograd.gradcheck(jacobian_determinant, (u,))


def test_jacobian_errors():
    with pytest.raises(ValueError, match="B, 3, D, H, W"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match=">= 2 voxels"):
        jacobian_determinant(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(TypeError):
        jacobian_determinant(np.zeros((1, 3, 4, 4, 4)))


def _l2r_sdlogj_reference(u):
    """The Learn2Reg evaluation code, rewritten: correlate with [-0.5, 0, 0.5] (zero padding),
    crop 2 voxels, std of log(clip(J + 3, 1e-9, 1e9))."""
    u = u.numpy()
    kernel = np.array([-0.5, 0.0, 0.5])
    grads = np.zeros((3, 3) + u.shape[1:])
    for j in range(3):
        shape = [1, 1, 1]
        shape[j] = 3
        for i in range(3):
            grads[i, j] = ndimage.correlate(u[i], kernel.reshape(shape), mode="constant")
    grads += np.eye(3).reshape(3, 3, 1, 1, 1)
    grads = grads[:, :, 2:-2, 2:-2, 2:-2]
    det = np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)))
    return np.log(np.clip(det + 3, 1e-9, 1e9)).std()


@pytest.mark.parametrize("scale", [0.1, 0.8])
def test_sdlogj_matches_learn2reg(scale):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 9, 8, 10, generator=g, dtype=torch.float64) * scale
    got = sdlogj(u, "l2r")
    for k in range(2):
        assert got[k].item() == pytest.approx(_l2r_sdlogj_reference(u[k]), rel=1e-10)


def test_sdlogj_plain_and_smoke():
    assert torch.all(sdlogj(torch.zeros(2, 3, 6, 6, 6)) == 0)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 3, 8, 8, 8, generator=g, dtype=torch.float64) * 0.2
    j = jacobian_determinant(u)[:, 2:-2, 2:-2, 2:-2]
    ref = np.log(np.clip(j.numpy(), 1e-9, 1e9)).std()
    assert sdlogj(u, "plain").item() == pytest.approx(ref)
    assert sdlogj(u, "plain", margin=0).shape == (1,)


def test_sdlogj_errors():
    u = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="variant"):
        sdlogj(u, "l2")
    with pytest.raises(ValueError, match="margin"):
        sdlogj(u, margin=2)
    with pytest.raises(ValueError, match="margin"):
        sdlogj(u, margin=-1)


def test_nonpositive_jacobian_fraction():
    u = torch.zeros(2, 3, 8, 8, 8)
    x = torch.arange(8.0).view(8, 1, 1)
    u[1, 0] = -2.0 * x  # x -> -x along axis 0: J = -1 everywhere
    frac = nonpositive_jacobian_fraction(u)
    assert frac.tolist() == [0.0, 1.0]
    u[1, 0, :4] = 0.0  # half folded (up to the finite-difference seam)
    frac = nonpositive_jacobian_fraction(u, margin=0)[1].item()
    j = jacobian_determinant(u)[1]
    assert frac == pytest.approx((j <= 0).float().mean().item())
    assert 0.3 < frac < 0.7


# -------------------------------------------------------------------------------------- EPE
def test_endpoint_error(dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 4, 5, 6, generator=g).to(dtype)
    b = torch.randn(2, 3, 4, 5, 6, generator=g).to(dtype)
    ref = torch.tensor(
        [
            np.mean(
                np.sqrt(
                    (((a[k] - b[k]).numpy() * np.array([2, 1, 3]).reshape(3, 1, 1, 1)) ** 2).sum(0)
                )
            )
            for k in range(2)
        ],
        dtype=dtype,
    )
    assert torch.allclose(endpoint_error(a, b, (2.0, 1.0, 3.0)), ref, rtol=1e-5)
    assert torch.allclose(endpoint_error(a, a), torch.zeros(2, dtype=dtype))
    mask = torch.zeros(2, 1, 4, 5, 6, dtype=torch.bool)
    mask[:, :, 0] = True
    expected = (a - b).norm(dim=1)[:, 0].flatten(1).mean(1)
    assert torch.allclose(endpoint_error(a, b, mask=mask), expected, rtol=1e-5)


def test_endpoint_error_errors():
    a = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        endpoint_error(a, torch.zeros(1, 3, 4, 4, 5))
    with pytest.raises(ValueError, match="true_disp"):
        endpoint_error(a, torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        endpoint_error(a, a, mask=torch.ones(1, 4, 4, 5, dtype=torch.bool))


# --------------------------------------------------------------------- RegistrationMetrics
def _batch(seed, b=2, shape=(10, 10, 10)):
    fixed = torch.from_numpy(np.stack([_blobs(shape, seed + k) for k in range(b)]))[:, None]
    moved = torch.from_numpy(np.stack([_blobs(shape, seed + 50 + k) for k in range(b)]))[:, None]
    g = torch.Generator().manual_seed(seed)
    disp = torch.randn(b, 3, *shape, generator=g) * 0.3
    true = disp + 0.1
    return fixed, moved, disp, true


def test_registration_metrics_per_pair_values():
    fixed, moved, disp, true = _batch(0)
    m = RegistrationMetrics(labels=[1, 2, 3], spacing=2.0)
    m.update(["a", "b"], moved, fixed, disp, true, runtime_s=[0.5, 1.5])
    rows = m.rows()
    assert [r["pair"] for r in rows] == ["a", "b"]
    for k, row in enumerate(rows):
        d = dice(moved[k, 0], fixed[k, 0], [1, 2, 3])
        h = hd95(moved[k, 0], fixed[k, 0], 2.0, [1, 2, 3])
        assert row["dice_1"] == pytest.approx(d[1])
        assert row["dice"] == pytest.approx(mean_over_labels(d))
        assert row["hd95"] == pytest.approx(mean_over_labels(h))
        assert row["sdlogj_l2r"] == pytest.approx(sdlogj(disp[k : k + 1]).item(), rel=1e-5)
        assert row["sdlogj"] == pytest.approx(sdlogj(disp[k : k + 1], "plain").item(), rel=1e-5)
        assert row["epe_mm"] == pytest.approx(2.0 * 0.1 * math.sqrt(3), rel=1e-4)
    out = m.compute()
    assert out["num_pairs"] == 2
    assert out["runtime_s"] == pytest.approx(1.0)
    # a per-batch spacing overrides the constructor's
    other = RegistrationMetrics(labels=[1, 2, 3], spacing=1.0)
    other.update(["a", "b"], moved, fixed, disp, true, spacing=(2.0, 2.0, 2.0))
    assert other.rows()[0]["hd95"] == pytest.approx(rows[0]["hd95"])
    assert other.rows()[0]["epe_mm"] == pytest.approx(rows[0]["epe_mm"])
    assert out["dice"] == pytest.approx((rows[0]["dice"] + rows[1]["dice"]) / 2)


def test_registration_metrics_no_double_counting():
    fixed, moved, disp, true = _batch(1, b=3)
    once = RegistrationMetrics(labels=[1, 2, 3])
    once.update(["p0", "p1", "p2"], moved, fixed, disp, true)
    twice = RegistrationMetrics(labels=[1, 2, 3])
    twice.update(["p0", "p1"], moved[:2], fixed[:2], disp[:2], true[:2])
    twice.update([1, "p1"], moved[1:3], fixed[1:3], disp[1:3], true[1:3])  # p1 repeated
    twice.update(["p2", "p0"], moved[[2, 0]], fixed[[2, 0]], disp[[2, 0]], true[[2, 0]])
    assert twice.compute()["num_pairs"] == 4  # p0, p1, p2 and the int id 1
    # The repeated ids must not change the means: compare with the unique pairs only.
    unique = RegistrationMetrics(labels=[1, 2, 3])
    unique.update(["p0", "p1", "p2"], moved, fixed, disp, true)
    unique.update([1], moved[1:2], fixed[1:2], disp[1:2], true[1:2])
    a, b = twice.compute(), unique.compute()
    for key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True)
    assert once.compute()["num_pairs"] == 3


def test_registration_metrics_merged_ranks():
    """Simulates the DDP gather: rank 1 repeats rank 0's first pair (sampler padding)."""
    fixed, moved, disp, true = _batch(2, b=3)
    rank0 = RegistrationMetrics(labels=[1, 2, 3])
    rank0.update(["p0", "p1"], moved[:2], fixed[:2], disp[:2], true[:2])
    rank1 = RegistrationMetrics(labels=[1, 2, 3])
    rank1.update(["p2", "p0"], moved[[2, 0]], fixed[[2, 0]], disp[[2, 0]], true[[2, 0]])
    empty = RegistrationMetrics(labels=[1, 2, 3])
    rank0.merge_state(rank1)
    rank0.merge_state(empty)
    single = RegistrationMetrics(labels=[1, 2, 3])
    single.update(["p0", "p1", "p2"], moved, fixed, disp, true)
    a, b = rank0.compute(), single.compute()
    assert a["num_pairs"] == 3
    for key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True)


def test_registration_metrics_empty_and_errors():
    m = RegistrationMetrics(labels=[1])
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = m.compute()
    assert out["num_pairs"] == 0 and math.isnan(out["dice"])
    fixed, moved, disp, _ = _batch(3, b=2)
    with pytest.raises(ValueError, match="pair ids"):
        m.update(["a"], moved, fixed, disp)
    with pytest.raises(TypeError, match="sequence"):
        m.update("ab", moved, fixed, disp)
    with pytest.raises(ValueError, match="runtime_s"):
        m.update(["a", "b"], moved, fixed, disp, runtime_s=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="longer"):
        m.update(["x" * 200, "b"], moved, fixed, disp)
    with pytest.raises(ValueError, match="labels"):
        RegistrationMetrics(labels=[])


def _ddp_worker(rank, world, port, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        fixed, moved, disp, true = _batch(5, b=3)
        m = RegistrationMetrics(labels=[1, 2, 3])
        # phase 1: rank 1 saw no pair at all
        if rank == 0:
            m.update(["p0", "p1", "p2"], moved, fixed, disp, true)
        first = m.compute()
        # phase 2: uneven split, rank 1 repeats p0 (what a DistributedSampler pads with)
        m.reset()
        if rank == 0:
            m.update(["p0", "p1", "p2"], moved, fixed, disp, true)
        else:
            m.update(["p0"], moved[:1], fixed[:1], disp[:1], true[:1])
        second = m.compute()
        if rank == 0:
            torch.save([first, second], result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_registration_metrics_real_ddp(tmp_path):
    """Two gloo processes: an empty rank, then a pair repeated on another rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(result)), nprocs=2, join=True)
    fixed, moved, disp, true = _batch(5, b=3)
    single = RegistrationMetrics(labels=[1, 2, 3])
    single.update(["p0", "p1", "p2"], moved, fixed, disp, true)
    ref = single.compute()
    for out in torch.load(result):
        assert out["num_pairs"] == 3
        for key in ref:
            assert out[key] == pytest.approx(ref[key], nan_ok=True)


def test_registration_metrics_epe_mask():
    """The endpoint error can be averaged inside a region (the body of synthetic pairs)."""
    from voxelopt.metrics import RegistrationMetrics

    disp = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
    true = torch.zeros_like(disp)
    true[:, 0, :2] = 2.0  # the field moves only the first half along axis 0
    labels = torch.ones(1, 1, 4, 4, 4, dtype=torch.long)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    whole = RegistrationMetrics(labels=[1], jacobian_margin=0)
    inside = RegistrationMetrics(labels=[1], jacobian_margin=0)
    whole.update(["p"], labels, labels, disp, true)
    inside.update(["p"], labels, labels, disp, true, epe_mask=mask)
    assert float(whole.compute()["epe_mm"]) == pytest.approx(1.0)
    assert float(inside.compute()["epe_mm"]) == pytest.approx(2.0)
