"""Trilinear sampling at ``x + u(x)`` in one pass: warps, squarings and compositions.

Rounded as :func:`voxelopt.transform.warp` rounds: the sampling position goes through
``grid_sample``'s normalised coordinates (``g = a_i + s_i u_i`` as one fused multiply-add, with
``a_i = i s_i - 1`` and ``s_i = 2 / (n - 1)``, then ``((g + 1) / 2)(n - 1)``), and the eight
corners are weighted and summed in the order of ATen's 3-D ``grid_sample``
(``align_corners=True``; zero or border padding).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from voxelopt.kernels._runtime import fma, jit, parallel_jit

__all__ = ["sample"]

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)


@jit
def _position(index, shift, size, scale, border):
    """Sampling position along one axis (voxels), rounded as ``grid_sample`` computes it.

    Args:
        index: voxel index along the axis.
        shift: float32 displacement (voxels).
        size: number of voxels along the axis.
        scale: ``float32(2 / max(size - 1, 1))``, voxels to normalised units.
        border: clamp to the volume.
    """
    g = fma(scale, shift, np.float32(index) * scale - _ONE)
    p = ((g + _ONE) / _TWO) * np.float32(size - 1)
    if border:
        return min(np.float32(size - 1), max(p, _ZERO))
    # beyond one voxel outside, every corner is padding: clamping there changes nothing and
    # keeps the corner indices within range of an int
    return min(np.float32(size + 1), max(p, np.float32(-2.0)))


@jit
def _boundary(flat, start, nc, nd, nh, nw, pz, py, px, c):
    """Channel ``c`` at a position whose eight corners are not all inside: ATen's sum over the
    corners that are (zero padding for the others)."""
    z0, y0, x0 = int(np.floor(pz)), int(np.floor(py)), int(np.floor(px))
    ex, wx = np.float32(x0 + 1) - px, px - np.float32(x0)
    ey, wy = np.float32(y0 + 1) - py, py - np.float32(y0)
    ez, wz = np.float32(z0 + 1) - pz, pz - np.float32(z0)
    v = _ZERO
    for k in range(8):
        z, y, x = z0 + (k >> 2), y0 + ((k >> 1) & 1), x0 + (k & 1)
        if 0 <= z < nd and 0 <= y < nh and 0 <= x < nw:
            weight = (wx if k & 1 else ex) * (wy if k & 2 else ey) * (wz if k & 4 else ez)
            v += flat[start + np.uint64(((c * nd + z) * nh + y) * nw + x)] * weight
    return v


@jit
def _three(flat, i, step, row, plane, weight):
    """Trilinear sums of three channels ``step`` apart from corner index ``i``, each in ATen's
    corner order; computed side by side so that the three dependent chains of additions
    overlap (26 % faster than one channel after the other)."""
    one = np.uint64(1)
    w0, w1, w2, w3, w4, w5, w6, w7 = weight
    j, k = i + step, i + step + step
    a, b, c = flat[i] * w0, flat[j] * w0, flat[k] * w0
    a, b, c = a + flat[i + one] * w1, b + flat[j + one] * w1, c + flat[k + one] * w1
    a, b, c = a + flat[i + row] * w2, b + flat[j + row] * w2, c + flat[k + row] * w2
    r1 = row + one
    a, b, c = a + flat[i + r1] * w3, b + flat[j + r1] * w3, c + flat[k + r1] * w3
    a, b, c = a + flat[i + plane] * w4, b + flat[j + plane] * w4, c + flat[k + plane] * w4
    p1 = plane + one
    a, b, c = a + flat[i + p1] * w5, b + flat[j + p1] * w5, c + flat[k + p1] * w5
    pr = plane + row
    a, b, c = a + flat[i + pr] * w6, b + flat[j + pr] * w6, c + flat[k + pr] * w6
    pr1 = pr + one
    a, b, c = a + flat[i + pr1] * w7, b + flat[j + pr1] * w7, c + flat[k + pr1] * w7
    return a, b, c


@jit
def _one(flat, i, row, plane, weight):
    """The trilinear sum of one channel from corner index ``i``, in ATen's corner order."""
    one = np.uint64(1)
    v = flat[i] * weight[0]
    v += flat[i + one] * weight[1]
    v += flat[i + row] * weight[2]
    v += flat[i + row + one] * weight[3]
    v += flat[i + plane] * weight[4]
    v += flat[i + plane + one] * weight[5]
    v += flat[i + plane + row] * weight[6]
    v += flat[i + plane + row + one] * weight[7]
    return v


@parallel_jit
def sample(image, disp, scales, border, add, out):
    """``out(x) = image(x + disp(x))`` (``+ disp(x)`` when ``add``), trilinear.

    Row by row: a vectorised pass computes the positions, the eight corner weights and the
    first corner's flat index, then a scalar pass gathers the corners of every channel.

    Args:
        image: ``(B or 1, C, D, H, W)`` float32, C-contiguous (batch 1 is broadcast).
        disp: ``(B, 3, D, H, W)`` float32 displacement in voxels.
        scales: ``(3,)`` float32 ``2 / max(n - 1, 1)`` per axis.
        border: clamp positions to the volume (``"border"``) instead of zero padding.
        add: add ``disp`` to the result (a composition or a squaring; needs ``C = 3``).
        out: ``(B, C, D, H, W)`` float32 result; must not overlap ``image`` or ``disp``.
    """
    nb, nc = disp.shape[0], image.shape[1]
    nd, nh, nw = disp.shape[2], disp.shape[3], disp.shape[4]
    flat = image.reshape(-1)
    # gathers use unsigned flat indices: numba adds no negative-index wrap-around to them
    row, plane = np.uint64(nw), np.uint64(nh * nw)
    volume = np.uint64(nd * nh * nw)
    # int32 corner arithmetic lets LLVM vectorise the first pass 8 wide (int64: 4 wide, 3x
    # slower); a flat index within one channel stays below 2^31 for any volume that fits
    nd32, nh32, nw32 = np.int32(nd), np.int32(nh), np.int32(nw)
    zero32, one32, outside = np.int32(0), np.int32(1), np.int32(-1)
    for bd in prange(nb * nd):
        b, d = bd // nd, bd % nd
        start = np.uint64((b if image.shape[0] > 1 else 0) * nc * nd * nh * nw)
        weights = np.empty((8, nw), np.float32)
        first = np.empty(nw, np.int32)  # flat index of corner (z0, y0, x0); -1: not inside
        for h in range(nh):
            s0, s1, s2 = disp[b, 0, d, h], disp[b, 1, d, h], disp[b, 2, d, h]
            w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
            w4, w5, w6, w7 = weights[4], weights[5], weights[6], weights[7]
            for w in range(nw):
                pz = _position(d, s0[w], nd, scales[0], border)
                py = _position(h, s1[w], nh, scales[1], border)
                px = _position(w, s2[w], nw, scales[2], border)
                z0, y0, x0 = np.floor(pz), np.floor(py), np.floor(px)
                # ATen's weights: distances to the opposite corner, multiplied x * y * z
                ex, wx = (x0 + _ONE) - px, px - x0
                ey, wy = (y0 + _ONE) - py, py - y0
                ez, wz = (z0 + _ONE) - pz, pz - z0
                w0[w], w1[w], w2[w], w3[w] = ex * ey * ez, wx * ey * ez, ex * wy * ez, wx * wy * ez
                w4[w], w5[w], w6[w], w7[w] = ex * ey * wz, wx * ey * wz, ex * wy * wz, wx * wy * wz
                z, y, x = np.int32(z0), np.int32(y0), np.int32(x0)
                inside = (z >= zero32) & (z + one32 < nd32) & (y >= zero32) & (y + one32 < nh32)
                inside &= (x >= zero32) & (x + one32 < nw32)
                first[w] = ((z * nh32 + y) * nw32 + x) if inside else outside
            shift, target = disp[b, :, d, h], out[b, :, d, h]
            for w in range(nw):
                if first[w] < 0:
                    pz = _position(d, s0[w], nd, scales[0], border)
                    py = _position(h, s1[w], nh, scales[1], border)
                    px = _position(w, s2[w], nw, scales[2], border)
                    for c in range(nc):
                        v = _boundary(flat, start, nc, nd, nh, nw, pz, py, px, c)
                        target[c, w] = v + shift[c, w] if add else v
                    continue
                corner = start + np.uint64(first[w])
                weight = (w0[w], w1[w], w2[w], w3[w], w4[w], w5[w], w6[w], w7[w])
                grouped = nc - nc % 3
                for c in range(0, grouped, 3):  # three channels at a time: sums interleave
                    a = _three(flat, corner + np.uint64(c) * volume, volume, row, plane, weight)
                    for k in range(3):
                        target[c + k, w] = a[k] + shift[c + k, w] if add else a[k]
                for c in range(grouped, nc):
                    v = _one(flat, corner + np.uint64(c) * volume, row, plane, weight)
                    target[c, w] = v + shift[c, w] if add else v


@parallel_jit
def sample_grid(image, grid, nearest, out):
    """``grid_sample(image, grid, align_corners=True, padding_mode="zeros")`` of one channel.

    Rounded as ATen's 3-D CPU kernel: ``p = ((g + 1) / 2)(n - 1)`` per axis, then the eight
    corners weighted by the distances to the opposite corner and summed in its order (corners
    outside count 0), or for ``nearest`` the voxel at ``nearbyint(p)`` (0 outside).

    Args:
        image: ``(D, H, W)`` float32, C-contiguous.
        grid: ``(D', H', W', 3)`` float32 normalised positions in ``(x, y, z)`` = ``(W, H, D)``
            order.
        nearest: nearest neighbour instead of trilinear.
        out: ``(D', H', W')`` float32 result.
    """
    nd, nh, nw = image.shape
    od, oh, ow = out.shape
    flat = image.reshape(-1)
    row, plane = np.uint64(nw), np.uint64(nh * nw)
    nd32, nh32, nw32 = np.int32(nd), np.int32(nh), np.int32(nw)
    zero32, one32 = np.int32(0), np.int32(1)
    sd, sh, sw = np.float32(nd - 1), np.float32(nh - 1), np.float32(nw - 1)
    zero = np.uint64(0)
    for dh in prange(od * oh):
        d, h = dh // oh, dh % oh
        points, target = grid[d, h], out[d, h]
        for w in range(ow):
            px = ((points[w, 0] + _ONE) / _TWO) * sw
            py = ((points[w, 1] + _ONE) / _TWO) * sh
            pz = ((points[w, 2] + _ONE) / _TWO) * sd
            if nearest:
                x, y, z = np.rint(px), np.rint(py), np.rint(pz)
                inside = 0.0 <= x < nw and 0.0 <= y < nh and 0.0 <= z < nd
                target[w] = (
                    flat[np.uint64((int(z) * nh + int(y)) * nw + int(x))] if inside else _ZERO
                )
                continue
            if not (abs(pz) < 2e9 and abs(py) < 2e9 and abs(px) < 2e9):  # far out, or NaN
                target[w] = _ZERO
                continue
            z0, y0, x0 = np.floor(pz), np.floor(py), np.floor(px)
            z, y, x = np.int32(z0), np.int32(y0), np.int32(x0)
            inside = (z >= zero32) & (z + one32 < nd32) & (y >= zero32) & (y + one32 < nh32)
            inside &= (x >= zero32) & (x + one32 < nw32)
            if not inside:  # some corners outside: ATen's sum over those inside
                target[w] = _boundary(flat, zero, 1, nd, nh, nw, pz, py, px, 0)
                continue
            ex, wx = (x0 + _ONE) - px, px - x0
            ey, wy = (y0 + _ONE) - py, py - y0
            ez, wz = (z0 + _ONE) - pz, pz - z0
            weight = (
                ex * ey * ez,
                wx * ey * ez,
                ex * wy * ez,
                wx * wy * ez,
                ex * ey * wz,
                wx * ey * wz,
                ex * wy * wz,
                wx * wy * wz,
            )
            corner = np.uint64((z * nh32 + y) * nw32 + x)
            target[w] = _one(flat, corner, row, plane, weight)
