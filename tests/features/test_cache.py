"""Feature cache: one forward of the fixed image for many moving images."""

from __future__ import annotations

import os

import pytest
import torch

from voxelopt.features import (
    CachedExtractor,
    FeatureExtractor,
    FeatureHead,
    HeadedExtractor,
    RawIntensity,
    file_key,
)


class _Counting(FeatureExtractor):
    def __init__(self) -> None:
        super().__init__(out_channels=1, pair_normalize=True)
        self.calls = 0

    def extract(self, image_hu):
        self.calls += 1
        return image_hu * 2


def test_explicit_key_runs_once():
    inner = _Counting()
    cache = CachedExtractor(inner)
    assert cache.out_channels == 1 and cache.pair_normalize is True
    img = torch.randn(1, 1, 4, 4, 4)
    a = cache(img, key="fixed")
    b = cache(img, key="fixed")
    assert inner.calls == 1 and a is b
    torch.testing.assert_close(a, img * 2)
    cache(img)  # no key: always computed
    assert inner.calls == 2


def test_file_key_changes_with_content(tmp_path):
    path = tmp_path / "fixed.nii.gz"
    path.write_bytes(b"abc")
    inner = _Counting()
    cache = CachedExtractor(inner)
    img = torch.randn(1, 1, 3, 3, 3)
    cache(img, key=path)
    cache(img, key=file_key(path))
    assert inner.calls == 1
    key = file_key(path)
    assert key[0] == str(path.resolve()) and key[2] == 3
    path.write_bytes(b"abcd")  # new size (and mtime): a new key
    os.utime(path, ns=(key[1] + 10**9, key[1] + 10**9))
    cache(img, key=path)
    assert inner.calls == 2


def test_missing_file_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        file_key(tmp_path / "absent.nii.gz")


def test_least_recently_used_dropped():
    inner = _Counting()
    cache = CachedExtractor(inner, max_items=2)
    img = torch.zeros(1, 1, 2, 2, 2)
    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cache(img, key=key)
    assert len(cache) == 2 and inner.calls == 3
    cache(img, key="a")
    assert inner.calls == 3
    cache(img, key="b")
    assert inner.calls == 4
    cache.clear()
    assert len(cache) == 0


def test_key_reused_for_other_image_shape():
    cache = CachedExtractor(_Counting())
    cache(torch.zeros(1, 1, 2, 2, 2), key="k")
    with pytest.raises(ValueError, match="cache key 'k'"):
        cache(torch.zeros(1, 1, 3, 2, 2), key="k")


def test_trainable_results_not_stored():
    ext = HeadedExtractor(RawIntensity(), FeatureHead(1, 1))
    cache = CachedExtractor(ext)
    out = cache(torch.zeros(1, 1, 3, 3, 3), key="k")
    assert out.requires_grad and len(cache) == 0


def test_invalid_arguments():
    with pytest.raises(TypeError, match="extractor"):
        CachedExtractor(torch.nn.Identity())
    with pytest.raises(ValueError, match="max_items"):
        CachedExtractor(RawIntensity(), max_items=0)
    with pytest.raises(TypeError, match="hashable"):
        CachedExtractor(RawIntensity())(torch.zeros(1, 1, 2, 2, 2), key=["x"])
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        CachedExtractor(RawIntensity())(torch.zeros(1, 2, 2, 2), key="x")
