"""The OBELISK-hybrid (TCIA) segmentation network, its layers and its pretrained weights.

Heinrich, Oktay, Bouteldja, "OBELISK-Net: Fewer layers to solve 3D multi-organ segmentation
with sparse deformable convolutions", Medical Image Analysis 2019. Written from the facts in
the shared ``docs/feature_backbones.md`` (section A) so that the shipped state dict
``obeliskhybrid_tcia_fold1.pth`` loads with ``strict=True``. Its grid sizes are fixed: the
input must be exactly ``144^3``. The registration wrapper is
:class:`voxelopt.features.ObeliskFeatures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelopt.paths import obelisk_weights

__all__ = [
    "OBELISK_CLASSES",
    "OBELISK_LAYERS",
    "OBELISK_SIZE",
    "ObeliskHybrid",
    "check_layer",
    "load_obelisk",
    "upsample",
]

OBELISK_SIZE = 144
"""Edge length of the cubic input grid the network's sampling grids are built for."""

OBELISK_CLASSES = (
    "background",
    "spleen",
    "pancreas",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "duodenum",
)

OBELISK_LAYERS: dict[str, tuple[int, int]] = {
    "logits": (9, OBELISK_SIZE),
    "decoder_fine": (9, OBELISK_SIZE),
    "decoder": (12, OBELISK_SIZE // 2),
    "decoder_coarse": (32, OBELISK_SIZE // 4),
}
"""Layers :meth:`ObeliskHybrid.forward` can return: name -> (channels, grid edge in the 144^3
frame). ``"logits"``: the 9 class scores (output of the 1x1x1 classifier ``conv77U``).
``"decoder_fine"``: its input, conv7U + BatchNorm + leaky ReLU at full resolution.
``"decoder"``: conv6U + BatchNorm + leaky ReLU at 72^3, the last map that mixes the
encoder, both OBELISK branches and the skip connection before the class-sized layers.
``"decoder_coarse"``: conv6bU + BatchNorm + leaky ReLU at 36^3 (encoder + OBELISK branch 2).
All except the logits follow a leaky ReLU."""


def check_layer(layer: str) -> str:
    """Return ``layer`` if it names an entry of :data:`OBELISK_LAYERS`, else raise ValueError."""
    if not isinstance(layer, str) or layer not in OBELISK_LAYERS:
        raise ValueError(f"layer must be one of {', '.join(OBELISK_LAYERS)}, got {layer!r}")
    return layer


def upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    """The network's own resizing: trilinear with ``align_corners=False`` (cell centres)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


_SLOPE = 0.025  # leaky ReLU negative slope used throughout the network


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, _SLOPE)


def _regular_grid(size: Sequence[int]) -> Tensor:
    """Normalised ``grid_sample`` coordinates of a regular ``(D, H, W)`` grid, ``(1, 1, N, 1, 3)``.

    Points sit at the voxel centres of a ``size`` grid spanning ``[-1, 1]`` with
    ``align_corners=False`` (last axis in ``(x, y, z) = (W, H, D)`` order).
    """
    theta = torch.eye(3, 4).unsqueeze(0)
    grid = F.affine_grid(theta, [1, 1, *size], align_corners=False)
    return grid.view(1, 1, -1, 1, 3)


class ObeliskHybrid(nn.Module):
    """OBELISK-hybrid (TCIA): a small U-Net fused with two OBELISK (sparse offset) branches.

    Input ``(B, 1, 144, 144, 144)`` intensity ``HU / 1024 + 1`` in the network's orientation;
    output ``(B, 9, 144, 144, 144)`` logits. Parameter names and shapes match the published
    state dict. Batch normalisation is meant to run in eval mode (running statistics).
    """

    def __init__(self, num_labels: int = 9) -> None:
        super().__init__()
        s = OBELISK_SIZE
        self.full = (s, s, s)
        self.half = (s // 2,) * 3
        self.quarter = (s // 4,) * 3
        # U-Net encoder
        self.conv0 = nn.Conv3d(1, 4, 3, padding=1)
        self.batch0 = nn.BatchNorm3d(4)
        self.conv1 = nn.Conv3d(4, 16, 3, stride=2, padding=1)
        self.batch1 = nn.BatchNorm3d(16)
        self.conv11 = nn.Conv3d(16, 16, 3, padding=1)
        self.batch11 = nn.BatchNorm3d(16)
        self.conv2 = nn.Conv3d(16, 32, 3, stride=2, padding=1)
        self.batch2 = nn.BatchNorm3d(32)
        self.conv22 = nn.Conv3d(32, 32, 3, padding=1)
        self.batch22 = nn.BatchNorm3d(32)
        self.conv3 = nn.Conv3d(32, 32, 3, padding=1)
        self.batch3 = nn.BatchNorm3d(32)
        # OBELISK branches: learned offsets and their dense 1x1x1 blocks
        self.offset1 = nn.Parameter(torch.randn(1, 128, 1, 1, 3) * 0.05)
        self.linear1a = nn.Conv3d(128, 128, 1, groups=2, bias=False)
        self.batch1a = nn.BatchNorm3d(128)
        self.linear1b = nn.Conv3d(128, 32, 1, bias=False)
        self.batch1b = nn.BatchNorm3d(160)
        self.linear1c = nn.Conv3d(160, 32, 1, bias=False)
        self.batch1c = nn.BatchNorm3d(192)
        self.linear1d = nn.Conv3d(192, 32, 1, bias=False)
        self.batch1d = nn.BatchNorm3d(224)
        self.linear1e = nn.Conv3d(224, 16, 1, bias=False)
        self.offset2 = nn.Parameter(torch.randn(1, 512, 1, 1, 3) * 0.05)
        self.linear2a = nn.Conv3d(512, 128, 1, groups=4, bias=False)
        self.batch2a = nn.BatchNorm3d(128)
        self.linear2b = nn.Conv3d(128, 32, 1, bias=False)
        self.batch2b = nn.BatchNorm3d(160)
        self.linear2c = nn.Conv3d(160, 32, 1, bias=False)
        self.batch2c = nn.BatchNorm3d(192)
        self.linear2d = nn.Conv3d(192, 32, 1, bias=False)
        self.batch2d = nn.BatchNorm3d(224)
        self.linear2e = nn.Conv3d(224, 32, 1, bias=False)
        # decoder
        self.conv6bU = nn.Conv3d(64, 32, 3, padding=1)
        self.batch6bU = nn.BatchNorm3d(32)
        self.conv6U = nn.Conv3d(64, 12, 3, padding=1)
        self.batch6U = nn.BatchNorm3d(12)
        self.conv7U = nn.Conv3d(16, num_labels, 3, padding=1)
        self.batch7U = nn.BatchNorm3d(num_labels)
        self.conv77U = nn.Conv3d(num_labels, num_labels, 1)
        # fixed sampling grids of the two branches (not part of the state dict)
        self.grid_shapes = {"1": self.quarter, "2": (s // 8, s // 4, s // 8)}
        self.register_buffer("grid1", _regular_grid(self.grid_shapes["1"]), persistent=False)
        self.register_buffer("grid2", _regular_grid(self.grid_shapes["2"]), persistent=False)

    def _branch(self, image: Tensor, branch: str) -> Tensor:
        """Obelisk branch ``"1"`` or ``"2"``: sample ``image`` at the regular grid plus each
        learned offset (channels = offsets), then the dense block of 1x1x1 convs."""
        grid, offset = getattr(self, f"grid{branch}"), getattr(self, f"offset{branch}")
        names, shape = branch, self.grid_shapes[branch]
        b = image.shape[0]
        pts = grid.expand(b, -1, -1, -1, -1) + offset  # (B, K, N, 1, 3)
        sampled = F.grid_sample(
            image, pts, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B, 1, K, N, 1)
        x = sampled.view(b, offset.shape[1], *shape)
        x = _lrelu(getattr(self, f"linear{names}a")(x))
        for step in "bcd":
            prev = chr(ord(step) - 1)
            bn = getattr(self, f"batch{names}{prev}")
            x = torch.cat([x, _lrelu(getattr(self, f"linear{names}{step}")(bn(x)))], dim=1)
        return _lrelu(getattr(self, f"linear{names}e")(getattr(self, f"batch{names}d")(x)))

    def forward(self, image: Tensor, layer: str = "logits") -> Tensor:
        """``(B, 1, 144, 144, 144)`` scaled intensity -> one layer's maps (default the logits).

        Args:
            image: ``(B, 1, 144, 144, 144)`` intensity ``HU / 1024 + 1``, network orientation.
            layer: a name of :data:`OBELISK_LAYERS`; the computation stops at that layer.

        Returns:
            ``(B, C, n, n, n)`` with ``C`` and ``n`` as in :data:`OBELISK_LAYERS`.
        """
        if image.dim() != 5 or tuple(image.shape[1:]) != (1, *self.full):
            raise ValueError(
                f"ObeliskHybrid input must have shape (B, 1, 144, 144, 144), got "
                f"{tuple(image.shape)}"
            )
        check_layer(layer)
        smooth1 = F.avg_pool3d(image, 3, stride=1, padding=1)
        smooth2 = F.avg_pool3d(smooth1, 3, stride=1, padding=1)
        b2 = upsample(self._branch(smooth2, "2"), self.quarter)

        x1 = _lrelu(self.batch0(self.conv0(image)))
        x = _lrelu(self.batch1(self.conv1(x1)))
        x2 = _lrelu(self.batch11(self.conv11(x)))
        x = _lrelu(self.batch2(self.conv2(x2)))
        x = _lrelu(self.batch22(self.conv22(x)))
        x3 = _lrelu(self.batch3(self.conv3(x)))

        x = _lrelu(self.batch6bU(self.conv6bU(torch.cat([x3, b2], dim=1))))
        if layer == "decoder_coarse":
            return x
        b1 = upsample(self._branch(smooth1, "1"), self.half)
        x = upsample(x, self.half)
        x = _lrelu(self.batch6U(self.conv6U(torch.cat([x, b1, x2], dim=1))))
        if layer == "decoder":
            return x
        x = upsample(x, self.full)
        x = _lrelu(self.batch7U(self.conv7U(torch.cat([x, x1], dim=1))))
        return x if layer == "decoder_fine" else self.conv77U(x)


def load_obelisk(path: str | PathLike | None = None) -> ObeliskHybrid:
    """Build :class:`ObeliskHybrid` and load the pretrained TCIA state dict (``strict=True``).

    Args:
        path: state-dict file; default :func:`voxelopt.paths.obelisk_weights`.

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: when the weights file does not exist.
    """
    path = Path(path) if path is not None else obelisk_weights()
    if not path.is_file():
        raise FileNotFoundError(
            f"OBELISK weights not found at {path}: put obeliskhybrid_tcia_fold1.pth there "
            f"(or set VOXELOPT_SHARED to the shared folder, or pass weights=PATH)"
        )
    net = ObeliskHybrid()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval()
