"""The Universal Model's 3D U-Net backbone and 8-channel "precls" head (the paper's features).

Architecture from the shared ``docs/feature_backbones.md`` (section B): the CLIP-driven
Universal Model (Liu et al., ICCV 2023) uses a 3D U-Net whose BatchNorm layers always
normalise with the statistics of the current batch; the features are the output of its
``precls_conv`` block (GroupNorm(16, 64) -> ReLU -> 1x1x1 conv to 8 channels), before the
class-specific heads. Its weights are not shipped: a user with a checkpoint points
:class:`UniversalFeatures` at it. Checkpoints store a dict whose ``"net"`` entry holds
``module.backbone.<name>...`` and ``module.precls_conv.<i>...`` keys; other keys (text
embeddings, class heads) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelopt.ct import HU_WINDOW
from voxelopt.features.base import FeatureExtractor
from voxelopt.features.intensity import window

__all__ = ["UniversalFeatures", "UniversalNet", "UniversalUNet3D", "load_universal_checkpoint"]

_PREFIXES = {"module.backbone.": "backbone.", "module.precls_conv.": "precls_conv."}
_MULTIPLE = 8  # three max-pools: every size must be a multiple of 2**3


class _BatchStatNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that always normalises with the current batch's statistics.

    The running-statistics buffers exist only so that checkpoints load; they are never read
    nor updated.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _ConvBlock(nn.Module):
    """conv3d 3x3x3 (padding 1) -> batch-statistics BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.bn1 = _BatchStatNorm3d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    """Two conv blocks; the caller max-pools the result (kept as the skip connection)."""

    def __init__(self, in_channels: int, mid: int, out_channels: int) -> None:
        super().__init__()
        self.ops = nn.Sequential(_ConvBlock(in_channels, mid), _ConvBlock(mid, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x)


class _Up(nn.Module):
    """Transposed conv (kernel 2, stride 2), concat ``[upsampled, skip]``, two conv blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, 2, stride=2)
        self.ops = nn.Sequential(
            _ConvBlock(in_channels + skip_channels, out_channels),
            _ConvBlock(out_channels, out_channels),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class UniversalUNet3D(nn.Module):
    """Universal Model 3D U-Net backbone: ``(B, 1, D, H, W)`` -> ``(B, 64, D, H, W)``.

    ``D, H, W`` must be multiples of 8 (three max-pools).
    """

    def __init__(self) -> None:
        super().__init__()
        self.down_tr64 = _Down(1, 32, 64)
        self.down_tr128 = _Down(64, 64, 128)
        self.down_tr256 = _Down(128, 128, 256)
        self.down_tr512 = _Down(256, 256, 512)
        self.up_tr256 = _Up(512, 256, 256)
        self.up_tr128 = _Up(256, 128, 128)
        self.up_tr64 = _Up(128, 64, 64)

    def forward(self, x: Tensor) -> Tensor:
        skip64 = self.down_tr64(x)
        skip128 = self.down_tr128(F.max_pool3d(skip64, 2))
        skip256 = self.down_tr256(F.max_pool3d(skip128, 2))
        x = self.down_tr512(F.max_pool3d(skip256, 2))
        x = self.up_tr256(x, skip256)
        x = self.up_tr128(x, skip128)
        return self.up_tr64(x, skip64)


class UniversalNet(nn.Module):
    """Backbone + ``precls_conv`` head: ``(B, 1, D, H, W)`` in ``[0, 1]`` -> ``(B, 8, D, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = UniversalUNet3D()
        self.precls_conv = nn.Sequential(nn.GroupNorm(16, 64), nn.ReLU(), nn.Conv3d(64, 8, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.precls_conv(self.backbone(x))


def load_universal_checkpoint(
    model: UniversalNet, checkpoint: str | PathLike | Mapping[str, object]
) -> list[str]:
    """Load a Universal Model checkpoint's backbone and precls weights into ``model``.

    Args:
        model: the network to fill.
        checkpoint: a file or an already loaded dict with a ``"net"`` entry whose keys are
            ``module.backbone.<name>...`` and ``module.precls_conv.<i>...`` (other keys are
            ignored; a missing ``num_batches_tracked`` counter is allowed).

    Returns:
        The checkpoint keys that were ignored (not part of the backbone or precls head).

    Raises:
        FileNotFoundError: if the file does not exist.
        TypeError: if ``checkpoint`` is neither a path nor a dict.
        ValueError: if there is no ``"net"`` entry, or keys are missing or have other shapes
            (every offending key is listed).
    """
    if isinstance(checkpoint, (str, PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"Universal Model checkpoint not found at {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    elif not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("net"), Mapping):
        raise ValueError("Universal Model checkpoint must be a dict with a 'net' state dict entry")
    state, ignored = {}, []
    for key, value in checkpoint["net"].items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            ignored.append(key)
        else:
            state[_PREFIXES[prefix] + key[len(prefix) :]] = value
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join("module." + k for k in missing))
    if mismatched:
        problems.append("shape mismatch: " + ", ".join("module." + k for k in mismatched))
    if unexpected:
        problems.append("unexpected: " + ", ".join("module." + k for k in unexpected))
    if problems:
        raise ValueError(
            "Universal Model checkpoint does not fit the network; " + "; ".join(problems)
        )
    for k, v in expected.items():
        if k not in state:  # num_batches_tracked absent from the file
            state[k] = v
    model.load_state_dict(state, strict=True)
    return ignored


class UniversalFeatures(FeatureExtractor):
    """Universal Model precls features (8 channels, pair-normalised), from a user's checkpoint.

    The CT is windowed to ``[low, high]`` HU and scaled to ``[0, 1]``, padded at the far end of
    each axis (border values replicated) to a multiple of 8 of at least 16 voxels, run through
    the network, and cropped back to the input grid.

    Args:
        weights: checkpoint file (or loaded dict) in the Universal Model layout.
        low: lower window bound (HU).
        high: upper window bound (HU).
        frozen: keep the weights fixed (default).

    Raises:
        FileNotFoundError: if ``weights`` is a path that does not exist.
        ValueError: if the checkpoint's keys do not fit (listed).
    """

    def __init__(
        self,
        weights: str | PathLike | Mapping[str, object],
        low: float = HU_WINDOW[0],
        high: float = HU_WINDOW[1],
        frozen: bool = True,
    ) -> None:
        super().__init__(out_channels=8, pair_normalize=True)
        self.context_voxels = 4  # as OBELISK: a network, dominated by its nearest voxels
        if weights is None:
            raise ValueError(
                "weights must name a Universal Model checkpoint (its weights are not shipped)"
            )
        if not float(low) < float(high):
            raise ValueError(f"window bounds must satisfy low < high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)
        self.net = UniversalNet()
        load_universal_checkpoint(self.net, weights)
        if frozen:
            self.freeze()

    def extract(self, image_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU -> ``(B, 8, D, H, W)`` precls features."""
        x = window(image_hu, self.low, self.high)
        shape = x.shape[2:]
        padded = [max(-(-n // _MULTIPLE) * _MULTIPLE, 2 * _MULTIPLE) for n in shape]
        pad = []
        for n, p in zip(reversed(shape), reversed(padded), strict=True):
            pad += [0, p - n]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        out = self.net(x.to(self.net.precls_conv[2].weight.dtype))
        return out[:, :, : shape[0], : shape[1], : shape[2]].to(image_hu.dtype)
