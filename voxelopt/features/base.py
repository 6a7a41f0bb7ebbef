"""The one interface every feature extractor implements.

A feature extractor maps a CT in Hounsfield units, ``(B, 1, D, H, W)`` with arrays in RAS+
orientation (``nibabel.as_closest_canonical``), to features ``(B, C, D, H, W)`` on the same
grid. Each extractor applies its own intensity transform. Pretrained networks are *frozen* by
default: their parameters do not require gradients and they stay in eval mode (running
BatchNorm statistics) even when a parent module is put in training mode.
"""

from __future__ import annotations

from torch import Tensor, nn

from voxelopt.checks import check_image, check_image_pair
from voxelopt.features.normalize import normalize_pair

__all__ = ["FeatureExtractor", "check_image", "check_image_pair"]


class FeatureExtractor(nn.Module):
    """Base class: validated ``forward`` around a subclass's ``extract``.

    Subclasses implement :meth:`extract`, build their parameters after calling
    ``super().__init__(out_channels, pair_normalize)``, and call :meth:`freeze` at the end of
    their constructor when they should start frozen.

    Attributes:
        out_channels: number ``C`` of feature channels.
        pair_normalize: whether the registration jointly normalises the fixed and moving
            features afterwards (:func:`voxelopt.features.normalize_pair`).
        context_voxels: how far (voxels of the input grid) a feature looks beyond its own
            voxel. Where an image has no data, the features within this distance of it are
            not trusted either (:mod:`voxelopt.fov`: the solver's masks are eroded by it).
            Subclasses set their own; the default, 2, suits small local operators.
    """

    context_voxels: int = 2

    def __init__(self, out_channels: int, pair_normalize: bool = False) -> None:
        super().__init__()
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be an integer >= 1, got {out_channels!r}")
        self.out_channels = out_channels
        self.pair_normalize = bool(pair_normalize)
        self._frozen = False

    # ----------------------------------------------------------------- freezing
    @property
    def frozen(self) -> bool:
        """Whether the parameters are fixed (no gradients, always eval mode)."""
        return self._frozen

    def freeze(self) -> FeatureExtractor:
        """Stop gradients to every parameter and keep the module in eval mode."""
        self._frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def unfreeze(self) -> FeatureExtractor:
        """Make every parameter trainable again (the train/eval mode is left to the caller)."""
        self._frozen = False
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Like ``nn.Module.train``, but a frozen extractor stays in eval mode."""
        return super().train(mode and not self._frozen)

    # ----------------------------------------------------------------- forward
    def forward(self, image_hu: Tensor) -> Tensor:
        """Features of a CT.

        Args:
            image_hu: ``(B, 1, D, H, W)`` Hounsfield units, RAS+ array orientation.

        Returns:
            ``(B, out_channels, D, H, W)`` features on the same grid.
        """
        return self.extract(check_image(image_hu))

    def extract(self, image_hu: Tensor) -> Tensor:
        """Compute the features of a validated floating ``(B, 1, D, H, W)`` HU image."""
        raise NotImplementedError

    # ----------------------------------------------------------------- pairs
    def prepare_pair(self, fixed_feat: Tensor, moving_feat: Tensor) -> tuple[Tensor, Tensor]:
        """Turn the outputs of :meth:`forward` for a fixed and a moving image into the pair the
        solver compares.

        The default jointly normalises the pair (:func:`voxelopt.features.normalize_pair`) when
        :attr:`pair_normalize` is set and returns it unchanged otherwise. Extractors whose
        output needs more than that (e.g. :class:`~voxelopt.features.CombinedExtractor`, which
        normalises and weights each branch) override it. Callers that cache single-image
        features (the fixed image's) apply this afterwards, on every pair.

        Args:
            fixed_feat: ``(B, C, D, H, W)`` output of :meth:`forward` for the fixed image.
            moving_feat: ``(B, C, D', H', W')`` output for the moving image.

        Returns:
            ``(fixed, moving)`` with the input shapes.
        """
        if not self.pair_normalize:
            return fixed_feat, moving_feat
        return normalize_pair(fixed_feat, moving_feat)

    def extract_pair(self, fixed_hu: Tensor, moving_hu: Tensor) -> tuple[Tensor, Tensor]:
        """Features of a fixed and a moving CT, ready for the solver.

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` Hounsfield units.
            moving_hu: ``(B, 1, D', H', W')`` Hounsfield units.

        Returns:
            :meth:`prepare_pair` of the two :meth:`forward` outputs.
        """
        return self.prepare_pair(self(fixed_hu), self(moving_hu))

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.out_channels}, pair_normalize={self.pair_normalize}, "
            f"frozen={self._frozen}"
        )
