"""Coarse grids of the affine stage: area-averaged CT, MIND-SSC features, body sample points.

Each image is reduced to voxels of about ``spacing_mm`` along its own axes (the orientation
of its grid is kept, so the level's voxel -> world matrix stays exact), its MIND-SSC
descriptor is computed there, and the fixed image gives the sample points (body voxels,
dilated by one voxel so that the skin edge counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voxelopt.ct import BODY_HU, HU_WINDOW
from voxelopt.features.intensity import window
from voxelopt.features.mind import mind_ssc

__all__ = [
    "Level",
    "body_points",
    "make_level",
    "memory_order_view",
    "pool_array",
    "pool_to_spacing",
]


@dataclass
class Level:
    """One image at one resolution.

    Attributes:
        hu: ``(1, 1, d, h, w)`` float32 area-averaged Hounsfield units.
        affine: ``(4, 4)`` voxel -> world (RAS+ mm) of ``hu``.
        table: ``(1, 12, d, h, w)`` MIND-SSC, or ``(1, 48, d, h, w)`` MIND-SSC followed by its
            spatial derivatives (channel ``12 + 3 c + a``: d feature ``c`` / d axis ``a``, per
            voxel) for the moving image, sampled together at once.
        body: ``(d, h, w)`` boolean body mask (largest component above ``BODY_HU``).
    """

    hu: Tensor
    affine: np.ndarray
    table: Tensor
    body: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape[2:])


def memory_order_view(array: np.ndarray) -> tuple[Tensor, tuple[int, int, int]]:
    """A float32 tensor of a 3D array with its axes in memory order, without a copy when it can.

    NIfTI arrays are Fortran-ordered: copying a clinical CT to C order costs more than the
    whole coarse pipeline, so the axes are permuted instead.

    Returns:
        ``(tensor, perm)`` with ``tensor == array.transpose(perm)`` (C-contiguous).
    """
    perm = tuple(int(a) for a in np.argsort([-abs(st) for st in array.strides], kind="stable"))
    view = array.transpose(perm)
    if view.dtype != np.float32 or not view.flags.c_contiguous:
        view = np.ascontiguousarray(view, dtype=np.float32)
    return torch.from_numpy(view), perm


def pool_array(
    array: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[Tensor, np.ndarray]:
    """:func:`pool_to_spacing` of a ``(D, H, W)`` numpy array, pooled in its memory order.

    Returns:
        The pooled ``(1, 1, d, h, w)`` contiguous float32 tensor (canonical axis order) and
        its ``(4, 4)`` voxel -> world matrix.
    """
    view, perm = memory_order_view(array)
    permuted = affine[:, [*perm, 3]]  # voxel -> world of the permuted array
    pooled, pooled_affine = pool_to_spacing(view[None, None], permuted, spacing_mm)
    inverse = tuple(int(a) for a in np.argsort(perm))
    out = pooled[0, 0].permute(inverse).contiguous()[None, None]
    return out, pooled_affine[:, [*inverse, 3]]


def pool_to_spacing(hu: Tensor, affine: np.ndarray, spacing_mm: float) -> tuple[Tensor, np.ndarray]:
    """Area-average a ``(1, 1, D, H, W)`` volume to voxels of about ``spacing_mm`` (never finer).

    Output voxel ``i`` covers input voxels ``[i r, (i + 1) r)`` (``r = n / m`` per axis), so its
    centre is input voxel ``(i + 1/2) r - 1/2``.

    Returns:
        The pooled ``(1, 1, d, h, w)`` volume and its ``(4, 4)`` voxel -> world matrix.
    """
    n = np.array(hu.shape[2:])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    size = np.minimum(n, np.maximum(2, np.round(n * spacing / spacing_mm))).astype(int)
    if np.all(size == n):
        return hu, affine.copy()
    out = F.adaptive_avg_pool3d(hu, tuple(int(s) for s in size))
    ratio = n / size
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = (ratio - 1.0) / 2.0
    return out, affine @ step


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _derivatives(x: Tensor) -> Tensor:
    """``(C, 3, d, h, w)`` central differences of ``(C, d, h, w)`` (one-sided at the border)."""
    out = x.new_empty((x.shape[0], 3, *x.shape[1:]))
    for a in range(3):
        src, dst = x.movedim(1 + a, 1), out[:, a].movedim(1 + a, 1)
        if src.shape[1] < 2:
            dst.zero_()
            continue
        dst[:, 1:-1] = (src[:, 2:] - src[:, :-2]) * 0.5
        dst[:, 0] = src[:, 1] - src[:, 0]
        dst[:, -1] = src[:, -1] - src[:, -2]
    return out


def make_level(hu: Tensor, affine: np.ndarray, moving: bool, dilation: int = 1) -> Level:
    """Features of one pooled image.

    Args:
        hu: ``(1, 1, d, h, w)`` float32 Hounsfield units.
        affine: ``(4, 4)`` voxel -> world of ``hu``.
        moving: also compute the derivatives of the features (the sampled image).
        dilation: MIND-SSC neighbour distance in voxels of this level.

    Returns:
        :class:`Level`.
    """
    mind = mind_ssc(window(hu, *HU_WINDOW), radius=1, dilation=dilation)
    table = mind
    if moving:
        table = torch.cat([mind, _derivatives(mind[0]).reshape(1, 36, *mind.shape[2:])], 1)
    body = _largest_component((hu[0, 0] > BODY_HU).numpy())
    return Level(hu=hu, affine=affine, table=table.contiguous(), body=body)


def body_points(level: Level, dilate: int = 1, max_points: int | None = None) -> np.ndarray:
    """Voxel indices of the (dilated) body mask, ``(N, 3)`` float64, optionally thinned.

    Thinning keeps every ``k``-th point of the raster order (deterministic) so that at most
    ``max_points`` remain.
    """
    from scipy import ndimage

    mask = level.body
    if dilate > 0:
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    idx = np.argwhere(mask).astype(np.float64)
    if len(idx) == 0:
        raise ValueError(f"no voxel above {BODY_HU} HU: the image holds no body to align")
    if max_points is not None and len(idx) > max_points:
        idx = idx[:: int(np.ceil(len(idx) / max_points))]
    return idx
