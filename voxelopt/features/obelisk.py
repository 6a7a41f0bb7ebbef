"""OBELISK-hybrid (TCIA) segmentation network and its 9 pre-softmax logits as features.

The network (Heinrich, Oktay, Bouteldja, "OBELISK-Net", Medical Image Analysis 2019) is written
from the facts in the shared ``docs/feature_backbones.md`` (section A) so that the shipped
state dict ``obeliskhybrid_tcia_fold1.pth`` loads with ``strict=True``. Its grid sizes are
fixed: the input must be exactly ``144^3``. Classes of the 9 output channels: 0 background,
1 spleen, 2 pancreas, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
8 duodenum.

:class:`ObeliskFeatures` wraps it for arbitrary CT grids: ``HU / 1024 + 1`` scaling, the
orientation the network was trained in, a crop around the abdomen, resizing to ``144^3`` and
back, and pasting the logits into the full grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelopt.features.base import FeatureExtractor
from voxelopt.paths import obelisk_weights
from voxelopt.transform import resize_volume

__all__ = [
    "OBELISK_CLASSES",
    "OBELISK_SIZE",
    "ObeliskFeatures",
    "ObeliskHybrid",
    "body_crop_box",
    "load_obelisk",
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

    def forward(self, image: Tensor) -> Tensor:
        """``(B, 1, 144, 144, 144)`` scaled intensity -> ``(B, 9, 144, 144, 144)`` logits."""
        if image.dim() != 5 or tuple(image.shape[1:]) != (1, *self.full):
            raise ValueError(
                f"ObeliskHybrid input must have shape (B, 1, 144, 144, 144), got "
                f"{tuple(image.shape)}"
            )

        def up(x: Tensor, size) -> Tensor:
            return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

        smooth1 = F.avg_pool3d(image, 3, stride=1, padding=1)
        smooth2 = F.avg_pool3d(smooth1, 3, stride=1, padding=1)
        b1 = up(self._branch(smooth1, "1"), self.half)
        b2 = up(self._branch(smooth2, "2"), self.quarter)

        x1 = _lrelu(self.batch0(self.conv0(image)))
        x = _lrelu(self.batch1(self.conv1(x1)))
        x2 = _lrelu(self.batch11(self.conv11(x)))
        x = _lrelu(self.batch2(self.conv2(x2)))
        x = _lrelu(self.batch22(self.conv22(x)))
        x3 = _lrelu(self.batch3(self.conv3(x)))

        x = _lrelu(self.batch6bU(self.conv6bU(torch.cat([x3, b2], dim=1))))
        x = up(x, self.half)
        x = _lrelu(self.batch6U(self.conv6U(torch.cat([x, b1, x2], dim=1))))
        x = up(x, self.full)
        x = _lrelu(self.batch7U(self.conv7U(torch.cat([x, x1], dim=1))))
        return self.conv77U(x)


CropBox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""Half-open voxel ranges ``((d0, d1), (h0, h1), (w0, w1))`` of a crop."""


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


def _check_box(box, shape: Sequence[int]) -> CropBox:
    try:
        out = tuple((int(a), int(b)) for a, b in box)
    except (TypeError, ValueError):
        raise ValueError(f"crop box must be ((d0, d1), (h0, h1), (w0, w1)), got {box!r}") from None
    if len(out) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(out, shape, strict=True)):
        raise ValueError(
            f"crop box {box!r} must hold three ranges 0 <= start < stop <= size within the "
            f"grid {tuple(shape)}"
        )
    return out  # type: ignore[return-value]


def _bbox(mask: Tensor, margin: float) -> CropBox | None:
    """Bounding box of a ``(D, H, W)`` mask, grown by ``margin`` times its extent per side."""
    if not bool(mask.any()):
        return None
    box = []
    for axis in range(3):
        other = [a for a in range(3) if a != axis]
        idx = torch.nonzero(mask.any(dim=other[1]).any(dim=other[0])).flatten()
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        grow = round(margin * (hi - lo))
        box.append((max(lo - grow, 0), min(hi + grow, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


_ANCHOR_CLASSES = (1, 6)  # spleen and liver: the largest, most reliably found organs


def _anchor_box(labels: Tensor, margin: float, quantile: float = 0.01) -> CropBox | None:
    """Robust box of the spleen and liver in a ``(D, H, W)`` OBELISK label map.

    The ``quantile`` .. ``1 - quantile`` range of the anchor voxels' coordinates per axis
    (ignores scattered false positives), grown by ``margin`` times its extent per side.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in _ANCHOR_CLASSES:
        mask |= labels == c
    idx = torch.nonzero(mask).to(torch.float64)
    if idx.shape[0] < 8:
        return None
    q = torch.tensor([quantile, 1.0 - quantile], dtype=torch.float64)
    box = []
    for axis, n in enumerate(labels.shape):
        lo, hi = torch.quantile(idx[:, axis], q).tolist()
        lo, hi = int(lo), int(hi) + 1
        grow = round(margin * (hi - lo))
        box.append((max(lo - grow, 0), min(hi + grow, n)))
    return tuple(box)  # type: ignore[return-value]


def body_crop_box(image_hu: Tensor, threshold: float = -500.0, margin: float = 0.0) -> CropBox:
    """Bounding box of the voxels above ``threshold`` HU (the body), or the whole grid if none.

    Args:
        image_hu: ``(D, H, W)`` Hounsfield units.
        threshold: HU above which a voxel counts as body (air is about -1000 HU).
        margin: growth of the box on each side, as a fraction of its extent.

    Returns:
        Half-open voxel ranges ``((d0, d1), (h0, h1), (w0, w1))``.
    """
    if image_hu.dim() != 3:
        raise ValueError(f"image_hu must have shape (D, H, W), got {tuple(image_hu.shape)}")
    box = _bbox(image_hu > threshold, margin)
    return box if box is not None else tuple((0, n) for n in image_hu.shape)  # type: ignore


class ObeliskFeatures(FeatureExtractor):
    """9 pre-softmax OBELISK-hybrid logits as registration features (pair-normalised).

    For each volume of the batch: choose a crop box, scale ``HU / 1024 + 1``, resize the crop
    trilinearly to ``144^3``, flip array axes 0 and 2 (tensor dims 2 and 4: the network was
    trained on RAS+ arrays flipped that way), run the network, flip back, resize the logits onto
    the crop and paste them into the full grid. Outside the crop the logits of the crop's border
    are replicated (mostly background there, and no artificial edge for the registration).

    Crop (``crop`` argument):

    * ``"body"`` (default): the bounding box of the voxels above ``threshold`` HU; one
      forward. Every voxel of the body gets the network's own logits, which is what
      registration needs: with ``"auto"`` the boxes of the two images of a pair can differ and
      the body outside them gets replicated border logits, and on our real-CT benchmark pairs
      Dice fell from 84.2 (body) to 76.7 (auto) with the endpoint error tripled
      (``docs/results_ablation.md``).
    * ``"auto"``: the best segmentation; a first pass on the body box finds the organs; the
      second, final pass runs on the bounding box of the voxels it labelled as an organ, grown
      by ``margin`` of its extent per side. The box is the 1st..99th percentile range of the voxels
      labelled spleen or liver (the largest, most reliably found organs; other classes have
      false positives in the pelvis). The network was trained on crops around the abdominal
      organs; on the shipped 122x101x112 abdomen-pelvis CT (3 mm) this lifts Dice of the
      argmax against TotalSegmentator from 0.896 liver / 0.661 spleen / 0.765 gallbladder
      (whole volume) to 0.916 / 0.771 / 0.713 (``tests/features/test_obelisk.py``). Two
      forwards (about 6-11 s on 2 CPU cores, peak memory 1.25 GB).
    * ``"none"``: the whole volume; one forward.
    * an explicit box ``((d0, d1), (h0, h1), (w0, w1))`` (half-open voxel ranges), used for
      every volume of the batch.

    Args:
        weights: state-dict file (default :func:`voxelopt.paths.obelisk_weights`).
        crop: ``"auto"``, ``"body"``, ``"none"`` or an explicit box.
        margin: growth of the automatic organ box per side, fraction of its extent.
        threshold: body threshold in HU for ``"body"`` and the first pass of ``"auto"``.
        frozen: keep the pretrained weights fixed (default).

    Raises:
        FileNotFoundError: when the weights file is absent.
    """

    def __init__(
        self,
        weights: str | PathLike | None = None,
        crop: str | Sequence[Sequence[int]] = "body",
        margin: float = 0.25,
        threshold: float = -500.0,
        frozen: bool = True,
    ) -> None:
        super().__init__(out_channels=9, pair_normalize=True)
        if isinstance(crop, str) and crop not in ("auto", "body", "none"):
            raise ValueError(f"crop must be 'auto', 'body', 'none' or a box, got {crop!r}")
        if not isinstance(crop, str):
            crop = tuple(tuple(r) for r in crop)
            if len(crop) != 3 or any(len(r) != 2 for r in crop):
                raise ValueError(f"crop box must be ((d0, d1), (h0, h1), (w0, w1)), got {crop!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must lie in [0, 1), got {margin!r}")
        self.crop = crop
        self.margin = float(margin)
        self.threshold = float(threshold)
        self.net = load_obelisk(weights)
        if frozen:
            self.freeze()

    def logits_in_box(self, image_hu: Tensor, box: CropBox) -> Tensor:
        """Logits of one volume's crop, on the crop's grid.

        Args:
            image_hu: ``(1, 1, D, H, W)`` Hounsfield units.
            box: crop box within ``(D, H, W)``.

        Returns:
            ``(1, 9, d1 - d0, h1 - h0, w1 - w0)`` logits.
        """
        (d0, d1), (h0, h1), (w0, w1) = box
        crop = image_hu[:, :, d0:d1, h0:h1, w0:w1] / 1024.0 + 1.0
        x = resize_volume(crop.to(next(self.net.parameters()).dtype), (OBELISK_SIZE,) * 3)
        logits = self.net(x.flip(2, 4)).flip(2, 4)
        return resize_volume(logits, crop.shape[2:]).to(image_hu.dtype)

    def _paste(self, logits: Tensor, box: CropBox, shape: Sequence[int]) -> Tensor:
        """Place crop logits into the full grid, replicating the crop's border outside it."""
        pad = []
        for (a, b), n in reversed(list(zip(box, shape, strict=True))):
            pad += [a, n - b]
        return F.pad(logits, pad, mode="replicate") if any(pad) else logits

    def box_for(self, image_hu: Tensor) -> CropBox:
        """The crop box used for one volume ``(1, 1, D, H, W)`` (may run the first pass)."""
        shape = tuple(image_hu.shape[2:])
        if not isinstance(self.crop, str):
            return _check_box(self.crop, shape)
        if self.crop == "none":
            return tuple((0, n) for n in shape)  # type: ignore[return-value]
        box = body_crop_box(image_hu[0, 0], self.threshold)
        if self.crop == "body":
            return box
        with torch.no_grad():
            first = self._paste(self.logits_in_box(image_hu, box), box, shape)
        organs = _anchor_box(first[0].argmax(0), self.margin)
        return organs if organs is not None else box

    def extract(self, image_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU -> ``(B, 9, D, H, W)`` OBELISK logits."""
        shape = tuple(image_hu.shape[2:])
        out = []
        for i in range(image_hu.shape[0]):
            vol = image_hu[i : i + 1]
            box = self.box_for(vol)
            out.append(self._paste(self.logits_in_box(vol, box), box, shape))
        return torch.cat(out, dim=0)
