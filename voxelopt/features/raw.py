"""Windowed raw intensity as a one-channel feature."""

from __future__ import annotations

from torch import Tensor

from voxelopt.ct import HU_WINDOW
from voxelopt.features.base import FeatureExtractor
from voxelopt.features.intensity import window

__all__ = ["RawIntensity"]


class RawIntensity(FeatureExtractor):
    """The CT clipped to a HU window and scaled to ``[0, 1]`` (1 channel, no pair normalisation).

    Args:
        low: lower window bound (HU).
        high: upper window bound (HU).
    """

    def __init__(self, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]) -> None:
        super().__init__(out_channels=1, pair_normalize=False)
        self.context_voxels = 0  # one voxel's own intensity
        if not float(low) < float(high):
            raise ValueError(f"window bounds must satisfy low < high, got low={low}, high={high}")
        self.low = float(low)
        self.high = float(high)

    def extract(self, image_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU -> ``(B, 1, D, H, W)`` in ``[0, 1]``."""
        return window(image_hu, self.low, self.high)
