"""OBELISK-hybrid (TCIA) as registration features: its 9 logits or an intermediate layer.

The network itself (Heinrich, Oktay, Bouteldja, "OBELISK-Net", Medical Image Analysis 2019) is
:class:`~voxelopt.features.obelisk_net.ObeliskHybrid`; its input grid is fixed to ``144^3``.
Classes of the 9 output channels: 0 background, 1 spleen, 2 pancreas, 3 left kidney,
4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 duodenum.

:class:`ObeliskFeatures` wraps it for arbitrary CT grids: ``HU / 1024 + 1`` scaling, the
orientation the network was trained in, a crop around the abdomen, resizing to ``144^3`` and
back, and pasting the chosen layer's maps (default the logits) into the full grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor

from voxelopt.ct import BODY_HU
from voxelopt.features.base import FeatureExtractor
from voxelopt.features.obelisk_net import (
    OBELISK_CLASSES,
    OBELISK_LAYERS,
    OBELISK_SIZE,
    ObeliskHybrid,
    check_layer,
    load_obelisk,
    upsample,
)
from voxelopt.transform import resize_volume

__all__ = [
    "OBELISK_CLASSES",
    "OBELISK_LAYERS",
    "OBELISK_SIZE",
    "ObeliskFeatures",
    "ObeliskHybrid",
    "body_crop_box",
    "check_layer",
    "load_obelisk",
]

CropBox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""Half-open voxel ranges ``((d0, d1), (h0, h1), (w0, w1))`` of a crop."""


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


def body_crop_box(image_hu: Tensor, threshold: float = BODY_HU, margin: float = 0.0) -> CropBox:
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
    """OBELISK-hybrid logits or decoder maps as registration features (pair-normalised).

    For each volume of the batch: choose a crop box, scale ``HU / 1024 + 1``, resize the crop
    trilinearly to ``144^3``, flip array axes 0 and 2 (tensor dims 2 and 4: the network was
    trained on RAS+ arrays flipped that way), run the network up to ``layer``, bring a coarser
    layer to ``144^3`` as the network itself does (trilinear, ``align_corners=False``), flip
    back, resize onto the crop and paste into the full grid. Outside the crop the maps of the
    crop's border are replicated (mostly background there, and no artificial edge for the
    registration).

    Layers (``layer`` argument; :data:`~voxelopt.features.obelisk_net.OBELISK_LAYERS`):
    ``"logits"`` (default, 9 channels), ``"decoder_fine"`` (9, the classifier's input),
    ``"decoder"`` (12, computed at 72^3: conv6U, the last map fusing the U-Net encoder, both
    OBELISK branches and the skip connection before the class-sized layers; registry name
    ``"obelisk_decoder"``) and ``"decoder_coarse"`` (32, computed at 36^3). The weights stay
    frozen for every layer.

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
        layer: which layer's maps are the features (see above).

    Raises:
        FileNotFoundError: when the weights file is absent.
        ValueError: for an unknown ``layer`` or ``crop``.
    """

    def __init__(
        self,
        weights: str | PathLike | None = None,
        crop: str | Sequence[Sequence[int]] = "body",
        margin: float = 0.25,
        threshold: float = BODY_HU,
        frozen: bool = True,
        layer: str = "logits",
    ) -> None:
        super().__init__(out_channels=OBELISK_LAYERS[check_layer(layer)][0], pair_normalize=True)
        if isinstance(crop, str) and crop not in ("auto", "body", "none"):
            raise ValueError(f"crop must be 'auto', 'body', 'none' or a box, got {crop!r}")
        if not isinstance(crop, str):
            crop = tuple(tuple(r) for r in crop)
            if len(crop) != 3 or any(len(r) != 2 for r in crop):
                raise ValueError(f"crop box must be ((d0, d1), (h0, h1), (w0, w1)), got {crop!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must lie in [0, 1), got {margin!r}")
        self.crop = crop
        self.layer = layer
        # The network sees much of its crop; the maps are dominated by the nearest few voxels.
        self.context_voxels = 4
        self.margin = float(margin)
        self.threshold = float(threshold)
        self.net = load_obelisk(weights)
        if frozen:
            self.freeze()

    def logits_in_box(self, image_hu: Tensor, box: CropBox) -> Tensor:
        """Logits of one volume's crop, on the crop's grid: ``layer_in_box(..., "logits")``."""
        return self.layer_in_box(image_hu, box, "logits")

    def layer_in_box(self, image_hu: Tensor, box: CropBox, layer: str | None = None) -> Tensor:
        """One layer's maps for one volume's crop, on the crop's grid.

        Args:
            image_hu: ``(1, 1, D, H, W)`` Hounsfield units.
            box: crop box within ``(D, H, W)``.
            layer: a name of :data:`OBELISK_LAYERS` (default: this extractor's ``layer``).

        Returns:
            ``(1, C, d1 - d0, h1 - h0, w1 - w0)`` with ``C`` the layer's channels.
        """
        layer = check_layer(self.layer if layer is None else layer)
        (d0, d1), (h0, h1), (w0, w1) = box
        crop = image_hu[:, :, d0:d1, h0:h1, w0:w1] / 1024.0 + 1.0
        x = resize_volume(crop.to(next(self.net.parameters()).dtype), (OBELISK_SIZE,) * 3)
        x = x.flip(2, 4)
        maps = self.net(x) if layer == "logits" else self.net(x, layer)
        maps = upsample(maps, (OBELISK_SIZE,) * 3).flip(2, 4)
        return resize_volume(maps, crop.shape[2:]).to(image_hu.dtype)

    def _paste(self, maps: Tensor, box: CropBox, shape: Sequence[int]) -> Tensor:
        """Place crop maps into the full grid, replicating the crop's border outside it."""
        pad = []
        for (a, b), n in reversed(list(zip(box, shape, strict=True))):
            pad += [a, n - b]
        return F.pad(maps, pad, mode="replicate") if any(pad) else maps

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
        """``(B, 1, D, H, W)`` HU -> ``(B, out_channels, D, H, W)`` maps of ``layer``."""
        shape = tuple(image_hu.shape[2:])
        out = []
        for i in range(image_hu.shape[0]):
            vol = image_hu[i : i + 1]
            box = self.box_for(vol)
            out.append(self._paste(self.layer_in_box(vol, box), box, shape))
        return torch.cat(out, dim=0)
