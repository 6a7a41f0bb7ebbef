"""Trainable feature heads on top of raw intensity or a frozen backbone."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from voxelopt.features.base import FeatureExtractor

__all__ = ["WEIGHTS_DIR", "FeatureHead", "HeadedExtractor", "PretrainedHead"]

#: shipped head weights (``NAME.pt``) with their description (``NAME.json``)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class FeatureHead(nn.Module):
    """Residual 3D conv head ``(B, in, D, H, W) -> (B, out, D, H, W)``, identity-like at start.

    ``out = proj(x) + residual(x)``. ``proj`` is the identity when ``in == out``, otherwise a
    1x1x1 conv initialised to copy input channel ``c % in`` into output channel ``c``.
    ``residual`` is ``depth`` 3x3x3 convs (``width`` channels, leaky ReLU between them) whose
    last layer is zero-initialised, so before training the head passes its input through and
    gradients still reach every layer after the first step.

    Args:
        in_channels: channels of the input features.
        out_channels: channels of the output features.
        width: channels of the hidden residual layers.
        depth: number of convs in the residual branch (>= 1).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16, depth: int = 2):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("width", width),
            ("depth", depth),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        if in_channels == out_channels:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Conv3d(in_channels, out_channels, 1)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.bias.zero_()
                for c in range(out_channels):
                    self.proj.weight[c, c % in_channels] = 1.0
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth - 1):
            layers += [nn.Conv3d(channels, width, 3, padding=1), nn.LeakyReLU(0.1)]
            channels = width
        last = nn.Conv3d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.residual = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D, H, W)``."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FeatureHead input must have shape (B, {self.in_channels}, D, H, W), got "
                f"{tuple(x.shape)}"
            )
        return self.proj(x) + self.residual(x)


class HeadedExtractor(FeatureExtractor):
    """A frozen backbone extractor followed by a trainable :class:`FeatureHead`.

    Args:
        backbone: any feature extractor; it is frozen here.
        head: head whose ``in_channels`` equals ``backbone.out_channels``.
        pair_normalize: whether the head's output is jointly normalised per pair (default:
            the backbone's setting).
    """

    def __init__(
        self, backbone: FeatureExtractor, head: FeatureHead, pair_normalize: bool | None = None
    ) -> None:
        if not isinstance(backbone, FeatureExtractor):
            raise TypeError(f"backbone must be a FeatureExtractor, got {type(backbone).__name__}")
        if not isinstance(head, FeatureHead):
            raise TypeError(f"head must be a FeatureHead, got {type(head).__name__}")
        if head.in_channels != backbone.out_channels:
            raise ValueError(
                f"head.in_channels ({head.in_channels}) must equal backbone.out_channels "
                f"({backbone.out_channels})"
            )
        norm = backbone.pair_normalize if pair_normalize is None else pair_normalize
        super().__init__(out_channels=head.out_channels, pair_normalize=norm)
        self.backbone = backbone.freeze()
        self.head = head
        self.context_voxels = backbone.context_voxels + sum(
            (m.kernel_size[0] - 1) // 2 for m in head.modules() if isinstance(m, nn.Conv3d)
        )

    @property
    def head_after_pair(self) -> bool:
        """Whether the head runs in :meth:`prepare_pair`, after the backbone's own pair step.

        True for a backbone that overrides ``prepare_pair`` (e.g. a
        :class:`~voxelopt.features.CombinedExtractor`, which normalises and weights each branch
        per pair): the head must see those prepared features, as the solver would without it.
        ``forward`` then returns the backbone's raw features (so a fixed image's stay cachable).
        """
        return type(self.backbone).prepare_pair is not FeatureExtractor.prepare_pair

    def extract(self, image_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU -> ``(B, head.out_channels, D, H, W)`` (the backbone's raw
        ``(B, backbone.out_channels, D, H, W)`` when :attr:`head_after_pair`)."""
        feat = self.backbone.extract(image_hu)
        return feat if self.head_after_pair else self.head(feat)

    def prepare_pair(self, fixed_feat: Tensor, moving_feat: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone's pair step, then the head (when :attr:`head_after_pair`), then the
        joint normalisation of :attr:`pair_normalize`."""
        if self.head_after_pair:
            fixed_feat, moving_feat = self.backbone.prepare_pair(fixed_feat, moving_feat)
            fixed_feat, moving_feat = self.head(fixed_feat), self.head(moving_feat)
        return super().prepare_pair(fixed_feat, moving_feat)


class PretrainedHead(HeadedExtractor):
    """A fine-tuned head shipped with the package, on its frozen backbone.

    ``NAME.pt`` holds the head's state dict; ``NAME.json`` beside it gives the backbone
    (a :func:`voxelopt.features.build_extractor` name), the head's arguments and how it was
    trained (config, command, measured Dice). The whole extractor starts frozen.

    Args:
        name: a shipped head (a ``.pt`` in :data:`WEIGHTS_DIR`).
        path: another head file with its ``.json`` (overrides ``name``).

    Raises:
        FileNotFoundError: when the head file or its description is absent.
    """

    def __init__(self, name: str = "mind_obelisk_head", path: str | PathLike | None = None):
        from voxelopt.features import build_extractor  # the registry imports this module

        file = Path(path) if path is not None else WEIGHTS_DIR / f"{name}.pt"
        for f in (file, file.with_suffix(".json")):
            if not f.is_file():
                raise FileNotFoundError(f"head file {f} not found (shipped: {shipped_heads()})")
        desc = json.loads(file.with_suffix(".json").read_text())
        head = FeatureHead(**desc["head"])
        head.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        super().__init__(build_extractor(desc["backbone"]), head)
        self.freeze()
        self.name, self.description = file.stem, desc


def shipped_heads() -> list[str]:
    """Names of the heads in :data:`WEIGHTS_DIR`."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt") if p.with_suffix(".json").is_file())
