"""Intensity windowing of CT Hounsfield units."""

from __future__ import annotations

from torch import Tensor

from voxelopt.ct import HU_WINDOW

__all__ = ["window"]


def window(hu: Tensor, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]) -> Tensor:
    """Clip Hounsfield units to ``[low, high]`` and scale them linearly to ``[0, 1]``.

    Args:
        hu: tensor of any shape, Hounsfield units.
        low: lower bound of the window (HU), maps to 0.
        high: upper bound of the window (HU), maps to 1; must exceed ``low``.

    Returns:
        Tensor of the same shape and (floating) dtype with values in ``[0, 1]``.
    """
    if not float(low) < float(high):
        raise ValueError(f"window bounds must satisfy low < high, got low={low}, high={high}")
    if not hu.is_floating_point():
        hu = hu.float()
    return (hu.clamp(low, high) - low) / (high - low)
