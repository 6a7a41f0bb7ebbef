"""Reuse the features of one fixed image registered to many moving images."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from torch import Tensor

from voxelopt.features.base import FeatureExtractor, check_image

__all__ = ["CachedExtractor", "file_key"]


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """Cache key of a file: ``(resolved path, mtime in ns, size in bytes)``.

    A rewritten file gets a new key, so stale features are never reused.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot key features by file {p}: it does not exist")
    st = p.stat()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


class CachedExtractor(FeatureExtractor):
    """Wraps an extractor and remembers its output per key (least recently used dropped).

    ``forward(image, key)`` returns the stored features when ``key`` was seen with an image of
    the same shape, dtype and device; otherwise it runs the extractor and stores the result.
    ``key=None`` bypasses the cache; a ``pathlib.Path`` (any ``os.PathLike``) is turned into
    :func:`file_key` so an edited file is recomputed (a ``str`` is an explicit key, not a
    path). Results that require gradients (a trainable extractor) are never stored: caching
    them would freeze the training signal.

    Args:
        extractor: the extractor to wrap (its ``out_channels``/``pair_normalize`` are copied).
        max_items: how many feature volumes to keep.
    """

    def __init__(self, extractor: FeatureExtractor, max_items: int = 4) -> None:
        if not isinstance(extractor, FeatureExtractor):
            raise TypeError(f"extractor must be a FeatureExtractor, got {type(extractor).__name__}")
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an integer >= 1, got {max_items!r}")
        super().__init__(extractor.out_channels, extractor.pair_normalize)
        self.extractor = extractor
        self.context_voxels = extractor.context_voxels
        self.max_items = max_items
        self._store: OrderedDict[Hashable, tuple[tuple, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every stored feature volume."""
        self._store.clear()

    def forward(self, image_hu: Tensor, key: Hashable | os.PathLike | None = None) -> Tensor:
        """Features of ``image_hu`` ``(B, 1, D, H, W)``, reused when ``key`` was seen before.

        Args:
            image_hu: ``(B, 1, D, H, W)`` Hounsfield units.
            key: hashable identity of the image (e.g. an explicit name), a ``Path`` of the
                file it was read from, or ``None`` to bypass the cache.

        Returns:
            ``(B, C, D, H, W)`` features.
        """
        image_hu = check_image(image_hu)
        if key is None:
            return self.extractor.extract(image_hu)
        if isinstance(key, os.PathLike):
            key = file_key(key)
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        signature = (tuple(image_hu.shape), image_hu.dtype, image_hu.device)
        hit = self._store.get(key)
        if hit is not None:
            if hit[0] != signature:
                raise ValueError(
                    f"cache key {key!r} was stored for an image {hit[0]}, got {signature}"
                )
            self._store.move_to_end(key)
            return hit[1]
        out = self.extractor.extract(image_hu)
        if not out.requires_grad:
            self._store[key] = (signature, out)
            while len(self._store) > self.max_items:
                self._store.popitem(last=False)
        return out

    def extract(self, image_hu: Tensor) -> Tensor:
        return self.extractor.extract(image_hu)

    def prepare_pair(self, fixed_feat: Tensor, moving_feat: Tensor) -> tuple[Tensor, Tensor]:
        """The wrapped extractor's :meth:`~FeatureExtractor.prepare_pair`."""
        return self.extractor.prepare_pair(fixed_feat, moving_feat)
