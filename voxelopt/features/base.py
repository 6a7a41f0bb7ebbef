"""The one interface every feature extractor implements.

A feature extractor maps a CT in Hounsfield units, ``(B, 1, D, H, W)`` with arrays in RAS+
orientation (``nibabel.as_closest_canonical``), to features ``(B, C, D, H, W)`` on the same
grid. Each extractor applies its own intensity transform. Pretrained networks are *frozen* by
default: their parameters do not require gradients and they stay in eval mode (running
BatchNorm statistics) even when a parent module is put in training mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FeatureExtractor", "check_image", "check_image_pair"]


def check_image(image: Tensor, name: str = "image_hu") -> Tensor:
    """Validate a ``(B, 1, D, H, W)`` image and return it as a floating tensor.

    Args:
        image: ``(B, 1, D, H, W)`` tensor, any real dtype (integers are cast to the default
            floating dtype).
        name: name of the argument used in error messages.

    Returns:
        The image, floating point.

    Raises:
        TypeError: if ``image`` is not a tensor or is complex/boolean.
        ValueError: if the shape is not ``(B, 1, D, H, W)`` or a value is not finite.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got {image.dtype}")
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, D, H, W), got {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        image = image.to(torch.get_default_dtype())
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return image


def check_image_pair(fixed_hu: Tensor, moving_hu: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a fixed/moving pair of ``(B, 1, D, H, W)`` images on the same grid.

    Returns:
        Both images, floating point (see :func:`check_image`).

    Raises:
        ValueError: naming the two shapes when they differ.
    """
    fixed_hu = check_image(fixed_hu, "fixed_hu")
    moving_hu = check_image(moving_hu, "moving_hu")
    if fixed_hu.shape != moving_hu.shape:
        raise ValueError(
            f"fixed_hu and moving_hu shapes differ: {tuple(fixed_hu.shape)} vs "
            f"{tuple(moving_hu.shape)}; resample the moving image onto the fixed grid first"
        )
    return fixed_hu, moving_hu


class FeatureExtractor(nn.Module):
    """Base class: validated ``forward`` around a subclass's ``extract``.

    Subclasses implement :meth:`extract`, build their parameters after calling
    ``super().__init__(out_channels, pair_normalize)``, and call :meth:`freeze` at the end of
    their constructor when they should start frozen.

    Attributes:
        out_channels: number ``C`` of feature channels.
        pair_normalize: whether the registration jointly normalises the fixed and moving
            features afterwards (:func:`voxelopt.features.normalize_pair`).
    """

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

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.out_channels}, pair_normalize={self.pair_normalize}, "
            f"frozen={self._frozen}"
        )
