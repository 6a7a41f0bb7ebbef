"""Feature extractors behind one interface, pair normalisation, trainable heads, and a registry.

Every extractor maps a CT in Hounsfield units ``(B, 1, D, H, W)`` (RAS+ arrays) to features
``(B, C, D, H, W)`` on the same grid; see :class:`FeatureExtractor`. Build one by name with
:func:`build_extractor`: a registry name (``"raw"``, ``"mind"``, ``"obelisk"``,
``"universal"``), a variant (a registry name with preset arguments, e.g. ``"obelisk_decoder"``
= ``obelisk`` with ``layer="decoder"``), or several joined by ``+`` with optional weights
(``"mind+obelisk:0.5"``: a :class:`CombinedExtractor`). :func:`available_extractors` lists the
single names; :func:`parse_extractor_name` checks a name without building it.
"""

from __future__ import annotations

from voxelopt.features.base import FeatureExtractor, check_image
from voxelopt.features.cache import CachedExtractor, file_key
from voxelopt.features.combined import CombinedExtractor, route_kwargs, split_combined_name
from voxelopt.features.heads import FeatureHead, HeadedExtractor, PretrainedHead
from voxelopt.features.intensity import window
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
    "EXTRACTORS",
    "VARIANTS",
    "CachedExtractor",
    "CombinedExtractor",
    "FeatureExtractor",
    "FeatureHead",
    "HeadedExtractor",
    "MindSSC",
    "ObeliskFeatures",
    "ObeliskHybrid",
    "PretrainedHead",
    "RawIntensity",
    "UniversalFeatures",
    "UniversalNet",
    "available_extractors",
    "base_extractors",
    "build_extractor",
    "check_image",
    "file_key",
    "load_obelisk",
    "load_universal_checkpoint",
    "mind_ssc",
    "normalize_pair",
    "parse_extractor_name",
    "window",
]

EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "raw": RawIntensity,
    "mind": MindSSC,
    "obelisk": ObeliskFeatures,
    "universal": UniversalFeatures,
    # issue 12: a head fine-tuned on the real subjects, shipped in voxelopt/features/weights
    "mind_obelisk_head": PretrainedHead,
}
"""Extractor classes by registry name."""


VARIANTS: dict[str, tuple[str, dict]] = {
    "obelisk_decoder": ("obelisk", {"layer": "decoder"}),
    "obelisk_decoder_coarse": ("obelisk", {"layer": "decoder_coarse"}),
    "obelisk_decoder_fine": ("obelisk", {"layer": "decoder_fine"}),
}
"""Variant name -> (registry name, preset constructor arguments); explicit arguments win."""


def available_extractors() -> list[str]:
    """Every single extractor name :func:`build_extractor` accepts (registry and variants),
    sorted; any of them can also be joined by ``+`` (with ``:WEIGHT``) into a combination."""
    return sorted([*EXTRACTORS, *VARIANTS])


def _valid_names() -> str:
    return (
        f"valid names: {', '.join(sorted(EXTRACTORS))}; variants: {', '.join(sorted(VARIANTS))}; "
        f"combine with '+' and weight with ':W' (e.g. 'mind+obelisk:0.5')"
    )


def parse_extractor_name(name: str) -> tuple[tuple[str, float | None], ...]:
    """Check an extractor name and split it into branches, without building anything.

    Args:
        name: a name of :func:`available_extractors`, or several joined by ``+``, each
            optionally ``NAME:WEIGHT`` (weight a number >= 0; case-insensitive).

    Returns:
        ``(name, weight)`` per branch (lowercased; ``weight`` ``None`` where not given). A
        plain single name gives one branch with weight ``None``.

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: for an unknown branch (the valid names are listed), an empty branch, or a
            bad weight.
    """
    branches = split_combined_name(name)
    for branch, _ in branches:
        if branch not in EXTRACTORS and branch not in VARIANTS:
            where = "" if len(branches) == 1 else f" in {name!r}"
            raise ValueError(f"unknown feature extractor {branch!r}{where}; {_valid_names()}")
    return branches


def base_extractors(name: str) -> tuple[str, ...]:
    """The registry names (:data:`EXTRACTORS`) behind each branch of ``name``, in order.

    E.g. ``"mind+obelisk_decoder:0.5"`` -> ``("mind", "obelisk")``; raises as
    :func:`parse_extractor_name`.
    """
    return tuple(VARIANTS.get(b, (b, {}))[0] for b, _ in parse_extractor_name(name))


def _build_single(name: str, kwargs: dict) -> FeatureExtractor:
    base, preset = VARIANTS.get(name, (name, {}))
    return EXTRACTORS[base](**{**preset, **kwargs})


def build_extractor(name: str, **kwargs) -> FeatureExtractor:
    """Build a feature extractor by name.

    Args:
        name: a registry name (``"raw"``, ``"mind"``, ``"obelisk"``, ``"universal"``), a
            variant (:data:`VARIANTS`, e.g. ``"obelisk_decoder"``), or several joined by ``+``
            with optional ``:WEIGHT`` (e.g. ``"mind+obelisk:0.5"``); case-insensitive.
        **kwargs: constructor arguments. A single name passes them all to its class (e.g.
            ``weights=PATH`` for OBELISK). A combined name takes ``branch_weights`` (a
            sequence, one weight per branch, instead of ``:WEIGHT`` in the name), ``balance``
            (see :class:`CombinedExtractor`) and ``branch_kwargs`` (``{branch name: dict}``);
            every other keyword goes to each branch whose constructor accepts it (so
            ``low``/``high`` reach MIND and ``weights`` reaches OBELISK).

    Returns:
        The extractor; a :class:`CombinedExtractor` for a name with ``+`` or ``:``.

    Raises:
        ValueError: for an unknown name (the valid ones are listed), a bad weight, or weights
            given both in the name and as ``branch_weights``.
        TypeError: for a keyword the extractor does not take (combined: that no branch takes).
    """
    branches = parse_extractor_name(name)
    if len(branches) == 1 and branches[0][1] is None:
        return _build_single(branches[0][0], kwargs)
    weights = kwargs.pop("branch_weights", None)
    balance = kwargs.pop("balance", True)
    per_branch = dict(kwargs.pop("branch_kwargs", None) or {})
    names = [b for b, _ in branches]
    if weights is not None and any(w is not None for _, w in branches):
        raise ValueError(f"give branch weights in the name {name!r} or as branch_weights, not both")
    if weights is None:
        weights = [1.0 if w is None else w for _, w in branches]
    unknown = sorted(set(per_branch) - set(names))
    if unknown:
        raise ValueError(f"branch_kwargs names {unknown} that are not branches of {name!r}")
    classes = [EXTRACTORS[b] for b in base_extractors(name)]
    routed = route_kwargs(classes, kwargs)
    built = [
        _build_single(b, {**kw, **per_branch.get(b, {})})
        for b, kw in zip(names, routed, strict=True)
    ]
    return CombinedExtractor(built, weights, balance=balance, names=names)
