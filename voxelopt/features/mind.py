"""MIND-SSC: modality independent neighbourhood descriptor with self-similarity context.

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarity context", MICCAI 2013. For every voxel ``x`` the six neighbours at
``dilation`` voxels along the axes form 12 pairs at distance ``sqrt(2) * dilation`` (the edges
of the octahedron they span). Per pair ``(p, q)`` the patch distance is the mean over a
``(2 radius + 1)^3`` box of ``(I(x + p + s) - I(x + q + s))^2``. With ``d'`` = distances minus
their minimum over the 12 pairs (robustness to noise, as in the common implementation) and
the variance estimate ``V = mean over pairs of d'`` (clamped to ``[1e-3, 1e3]`` times its
volume mean), the descriptor is ``exp(-d' / V)`` divided by its maximum over the 12 channels.
Borders replicate the image.

Channel order: pairs ``(p, q)`` with ``p < q`` in the neighbour order
``-D, -H, -W, +W, +H, +D`` (offsets ``(-1,0,0), (0,-1,0), (0,0,-1), (0,0,1), (0,1,0), (1,0,0)``),
enumerated lexicographically and keeping those at squared distance 2 (non-opposite pairs).
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor

from voxelopt import kernels
from voxelopt.ct import HU_WINDOW
from voxelopt.features.base import FeatureExtractor, check_image
from voxelopt.features.intensity import window

__all__ = ["MIND_PAIRS", "MindSSC", "mind_ssc"]

_NEIGHBOURS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0))

MIND_PAIRS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = tuple(
    (p, q)
    for p, q in combinations(_NEIGHBOURS, 2)
    if sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) == 2
)
"""The 12 neighbour pairs (unit offsets, scaled by the dilation) in channel order."""


def _shift(padded: Tensor, offset: tuple[int, int, int], pad: int, shape) -> Tensor:
    """``I(x + offset)`` for every ``x`` of the unpadded grid, from an image padded by ``pad``."""
    d, h, w = (pad + o for o in offset)
    return padded[:, :, d : d + shape[0], h : h + shape[1], w : w + shape[2]]


def mind_ssc(image: Tensor, radius: int = 1, dilation: int = 2, backend: str = "auto") -> Tensor:
    """MIND-SSC descriptor of an image.

    Args:
        image: ``(B, 1, D, H, W)`` floating image (any intensity scale, e.g. windowed CT).
        radius: half-width of the box over which patch distances are summed (voxels, >= 0).
        dilation: distance of the six neighbours from the centre (voxels, >= 1); the pairs are
            ``sqrt(2) * dilation`` apart.
        backend: ``"torch"`` (the reference, differentiable, any device), ``"numba"`` (the fused
            CPU kernel :func:`voxelopt.kernels.mind_ssc`, float32, no gradient; 7x faster on
            two cores) or ``"auto"`` (numba where it applies).

    Returns:
        ``(B, 12, D, H, W)`` descriptor in ``(0, 1]``, maximum 1 over channels at each voxel.
    """
    image = check_image(image, "image")
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")
    if kernels.use_numba(backend, image):
        return kernels.mind_ssc(image, radius, dilation)
    shape = image.shape[2:]
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    ssd = []
    for p, q in MIND_PAIRS:
        a = _shift(padded, tuple(dilation * c for c in p), dilation, shape)
        b = _shift(padded, tuple(dilation * c for c in q), dilation, shape)
        ssd.append((a - b) ** 2)
    dist = torch.cat(ssd, dim=1)  # (B, 12, D, H, W)
    if radius > 0:
        k = 2 * radius + 1
        dist = F.avg_pool3d(F.pad(dist, (radius,) * 6, mode="replicate"), k, stride=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    mean_var = var.mean(dim=(2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, mean_var * 1000.0), mean_var * 0.001)
    # a constant image has zero variance everywhere: fall back to 1 (descriptor = 1)
    var = torch.where(var > 0, var, torch.ones_like(var))
    mind = torch.exp(-dist / var)
    return mind / mind.max(dim=1, keepdim=True).values


class MindSSC(FeatureExtractor):
    """MIND-SSC (12 channels) of the windowed CT; no pair normalisation needed.

    Args:
        radius: patch half-width (voxels).
        dilation: neighbour distance (voxels); ConvexAdam uses radius 1, dilation 2.
        low: lower window bound (HU).
        high: upper window bound (HU).
    """

    def __init__(
        self,
        radius: int = 1,
        dilation: int = 2,
        low: float = HU_WINDOW[0],
        high: float = HU_WINDOW[1],
    ) -> None:
        super().__init__(out_channels=len(MIND_PAIRS), pair_normalize=False)
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")
        if not float(low) < float(high):
            raise ValueError(f"window bounds must satisfy low < high, got low={low}, high={high}")
        self.radius, self.dilation = radius, dilation
        self.context_voxels = radius + dilation
        self.low, self.high = float(low), float(high)

    def extract(self, image_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU -> ``(B, 12, D, H, W)`` MIND-SSC of the windowed image."""
        return mind_ssc(window(image_hu, self.low, self.high), self.radius, self.dilation)
