"""The one registration pair type of the project.

A :class:`Pair` holds two CT images on one grid with whatever is known about them (labels, the
true field of a synthetic pair, the grid's spacing and affine). Synthetic pairs
(:func:`voxelopt.phantom.make_pair`), the comparison runner and the datasets all use it; a
dataset sample is :meth:`Pair.sample`, the dict a ``DataLoader`` collates into a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Pair"]


@dataclass
class Pair:
    """Fixed and moving CT on one grid (``fixed(x) = moving(x + true_disp(x))`` when known).

    Attributes:
        fixed_hu: ``(1, 1, D, H, W)`` float32 HU.
        moving_hu: ``(1, 1, D, H, W)`` float32 HU on the same grid.
        fixed_labels: ``(1, 1, D, H, W)`` int64 organ labels (0 = background).
        moving_labels: ``(1, 1, D, H, W)`` int64 organ labels.
        spacing: voxel size in mm along ``(D, H, W)``.
        true_disp: ``(1, 3, D, H, W)`` float32 known field in voxels (synthetic pairs), or
            ``None``.
        name: the pair's name in tables, e.g. ``"ct_seed0"`` or ``"0024_0025"``.
        affine: ``(4, 4)`` voxel -> world (RAS+, mm) matrix of the grid.
    """

    fixed_hu: Tensor
    moving_hu: Tensor
    fixed_labels: Tensor
    moving_labels: Tensor
    spacing: tuple[float, float, float]
    true_disp: Tensor | None = None
    name: str = "pair"
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))

    def sample(self, pair_id: int = 0) -> dict:
        """The pair as a dataset sample (batch dimension dropped; see :mod:`voxelopt.data`).

        Returns:
            ``{"fixed", "moving": (1, D, H, W), "fixed_label", "moving_label": (1, D, H, W),
            "spacing": (3,), "pair_id": int, "pair": str}`` plus ``"true_disp": (3, D, H, W)``
            when the field is known.
        """
        out = {
            "fixed": self.fixed_hu[0],
            "moving": self.moving_hu[0],
            "fixed_label": self.fixed_labels[0],
            "moving_label": self.moving_labels[0],
            "spacing": torch.tensor(self.spacing, dtype=torch.float32),
            "pair_id": pair_id,
            "pair": self.name,
        }
        if self.true_disp is not None:
            out["true_disp"] = self.true_disp[0]
        return out
