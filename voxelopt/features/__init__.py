"""Feature extractors behind one interface, pair normalisation, trainable heads, and a registry.

Every extractor maps a CT in Hounsfield units ``(B, 1, D, H, W)`` (RAS+ arrays) to features
``(B, C, D, H, W)`` on the same grid; see :class:`FeatureExtractor`. Build one by name with
:func:`build_extractor` (``"raw"``, ``"mind"``, ``"obelisk"``, ``"universal"``).
"""

from __future__ import annotations

from voxelopt.features.base import FeatureExtractor, check_image
from voxelopt.features.cache import CachedExtractor, file_key
from voxelopt.features.heads import FeatureHead, HeadedExtractor
from voxelopt.features.intensity import DEFAULT_WINDOW, window
from voxelopt.features.mind import MindSSC, mind_ssc
from voxelopt.features.normalize import normalize_pair
from voxelopt.features.obelisk import ObeliskFeatures, ObeliskHybrid, load_obelisk
from voxelopt.features.raw import RawIntensity
from voxelopt.features.universal import (
    UniversalFeatures,
    UniversalNet,
    load_universal_checkpoint,
)

__all__ = [
    "DEFAULT_WINDOW",
    "EXTRACTORS",
    "CachedExtractor",
    "FeatureExtractor",
    "FeatureHead",
    "HeadedExtractor",
    "MindSSC",
    "ObeliskFeatures",
    "ObeliskHybrid",
    "RawIntensity",
    "UniversalFeatures",
    "UniversalNet",
    "build_extractor",
    "check_image",
    "file_key",
    "load_obelisk",
    "load_universal_checkpoint",
    "mind_ssc",
    "normalize_pair",
    "window",
]

EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "raw": RawIntensity,
    "mind": MindSSC,
    "obelisk": ObeliskFeatures,
    "universal": UniversalFeatures,
}
"""Extractor classes by registry name."""


def build_extractor(name: str, **kwargs) -> FeatureExtractor:
    """Build a feature extractor by name.

    Args:
        name: one of ``"raw"``, ``"mind"``, ``"obelisk"``, ``"universal"`` (case-insensitive).
        **kwargs: constructor arguments of that extractor (e.g. ``weights=...``).

    Returns:
        The extractor.

    Raises:
        ValueError: for an unknown name (the valid ones are listed).
    """
    if not isinstance(name, str) or name.lower() not in EXTRACTORS:
        raise ValueError(
            f"unknown feature extractor {name!r}; valid names: {', '.join(sorted(EXTRACTORS))}"
        )
    return EXTRACTORS[name.lower()](**kwargs)
