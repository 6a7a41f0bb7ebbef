"""The extractor registry."""

from __future__ import annotations

import pytest

from voxelopt.features import EXTRACTORS, FeatureExtractor, MindSSC, RawIntensity, build_extractor


def test_names():
    assert set(EXTRACTORS) == {"raw", "mind", "obelisk", "universal", "mind_obelisk_head"}
    assert all(issubclass(cls, FeatureExtractor) for cls in EXTRACTORS.values())


@pytest.mark.parametrize("name, cls", [("raw", RawIntensity), ("mind", MindSSC), ("MIND", MindSSC)])
def test_build(name, cls):
    assert isinstance(build_extractor(name), cls)


def test_kwargs_forwarded():
    assert build_extractor("mind", radius=2, dilation=3).dilation == 3


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="mind, mind_obelisk_head, obelisk, raw, universal"):
        build_extractor("sift")


def test_bad_kwargs():
    with pytest.raises(TypeError):
        build_extractor("raw", radius=1)
