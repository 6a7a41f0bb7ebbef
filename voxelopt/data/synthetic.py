"""Synthetic registration pairs with a known field, of the shared real CT or of the phantom."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from voxelopt.data.pair import Pair
from voxelopt.data.volumes import load_abdomen_ct

__all__ = ["make_pairs"]


def make_pairs(
    source: Literal["ct", "phantom"] = "ct",
    seeds: Sequence[int] = (0, 1, 2),
    downsample: int = 1,
    max_displacement_mm: float = 15.0,
    control_spacing_mm: float = 40.0,
    phantom_shape: Sequence[int] = (48, 40, 56),
    phantom_spacing: float = 6.0,
) -> list[Pair]:
    """Synthetic pairs by known smooth deformations (:func:`voxelopt.phantom.make_pair`).

    Args:
        source: ``"ct"`` (the shared real CT with its 13-organ labels) or ``"phantom"``.
        seeds: one pair per seed.
        downsample: integer downsampling of the shared CT (3 mm -> ``3 * downsample`` mm).
        max_displacement_mm: largest displacement of each true field (mm).
        control_spacing_mm: control-point spacing of the random fields (mm).
        phantom_shape: ``(D, H, W)`` of the phantom (``source="phantom"``).
        phantom_spacing: voxel size of the phantom (mm).

    Returns:
        One :class:`Pair` per seed.
    """
    from voxelopt.phantom import make_pair, make_phantom

    if not seeds:
        raise ValueError("seeds must name at least one pair")
    if source == "ct":
        ct, lab = load_abdomen_ct(downsample)
        images = {s: (ct.data, lab.data) for s in seeds}
        spacing, affine = ct.spacing, ct.affine
    elif source == "phantom":
        spacing = (float(phantom_spacing),) * 3
        images = {s: make_phantom(phantom_shape, phantom_spacing, seed=s) for s in seeds}
        affine = np.diag([*spacing, 1.0])
    else:
        raise ValueError(f"source must be 'ct' or 'phantom', got {source!r}")
    pairs = []
    for s in seeds:
        hu, labels = images[s]
        p = make_pair(
            hu,
            labels,
            max_displacement_mm,
            spacing,
            seed=int(s),
            control_spacing_mm=control_spacing_mm,
        )
        p.name, p.affine = f"{source}_seed{s}", np.asarray(affine, dtype=np.float64)
        pairs.append(p)
    return pairs
