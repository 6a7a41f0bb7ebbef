"""Volumes on the working grid: the one meaning of "downsample", and subjects as tensors.

``downsample=N`` means everywhere in the project: keep every ``N``-th voxel of the grid along
each axis, starting at the first, so the spacing is exactly ``N`` times the original and the
world position of voxel 0 is unchanged (``ceil(n / N)`` voxels per axis); images are
Gaussian-filtered first (sigma ``N / 2`` voxels) against aliasing, label maps are subsampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from voxelopt.checks import check_positive_int
from voxelopt.io import Volume, load_labels, load_volume
from voxelopt.paths import abdomen_ct_dir

__all__ = [
    "downsample_volume",
    "downsampled_shape",
    "load_abdomen_ct",
    "load_subject",
    "prepare_volume",
]


def downsampled_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Grid size after keeping every ``factor``-th voxel: ``ceil(n / factor)`` per axis."""
    factor = check_positive_int(factor, "downsample")
    return tuple(-(-int(n) // factor) for n in shape)


def downsample_volume(volume: Volume, factor: int, labels: bool = False) -> Volume:
    """Keep every ``factor``-th voxel of a volume (see the module docstring).

    Args:
        volume: image (HU) or label map.
        factor: integer ``>= 1``.
        labels: subsample without filtering (label maps).

    Returns:
        The coarser :class:`~voxelopt.io.Volume` with its affine scaled accordingly.
    """
    factor = check_positive_int(factor, "downsample")
    if factor == 1:
        return volume
    data = volume.data
    if not labels:
        from scipy import ndimage

        data = ndimage.gaussian_filter(data.astype(np.float64), 0.5 * factor, mode="nearest")
    data = np.ascontiguousarray(data[::factor, ::factor, ::factor]).astype(volume.data.dtype)
    affine = volume.affine.copy()
    affine[:3, :3] = affine[:3, :3] * factor
    return Volume(data, affine, volume.ornt.copy(), volume.path)


def load_abdomen_ct(downsample: int = 1) -> tuple[Volume, Volume]:
    """The shared real abdominal CT and its 13-organ labels (RAS+, 3 mm).

    Args:
        downsample: integer factor (see the module docstring).

    Returns:
        ``(ct, labels)`` volumes on the same grid (float32 HU, int64 labels).

    Raises:
        FileNotFoundError: the shared data folder or a file in it is absent.
    """
    check_positive_int(downsample, "downsample")
    folder = abdomen_ct_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"shared abdominal CT folder not found: {folder}")
    ct = load_volume(folder / "ct.nii.gz")
    lab = load_labels(folder / "labels_btcv13.nii.gz")
    return downsample_volume(ct, downsample), downsample_volume(lab, downsample, labels=True)


def _resize_labels(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resampling of ``(..., D, H, W)`` at the corner-aligned coordinates
    ``i * (n - 1) / (m - 1)`` that :func:`voxelopt.transform.resize_volume` samples."""
    for axis, (n, m) in enumerate(zip(label.shape[-3:], size, strict=True)):
        scale = (n - 1) / (m - 1) if m > 1 else 0.0
        index = torch.round(torch.arange(m, dtype=torch.float64) * scale).long()
        label = label.index_select(label.dim() - 3 + axis, index)
    return label


def prepare_volume(
    image: Volume,
    label: Volume,
    downsample: int = 1,
    clip_hu: tuple[float, float] | None = None,
    size: Sequence[int] | None = None,
    spacing_mm: float | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bring a loaded CT and its labels onto the working grid as tensors.

    Args:
        image: CT volume (HU, RAS+).
        label: its label map on the same grid.
        downsample: integer factor (see the module docstring).
        clip_hu: optional ``(low, high)`` HU window.
        size: exact ``(D, H, W)`` to resample to instead (corner-aligned, applied after
            ``downsample``; for tests and fixed-size training crops).
        spacing_mm: the working grid of ``voxelopt register --spacing``: a voxel size in mm
            or ``"auto"`` (:func:`voxelopt.grid.working_spacing`), anti-aliased, over the same
            box of voxel centres; applied after ``downsample``.

    Returns:
        ``image (1, D, H, W)`` float32, ``label (1, D, H, W)`` int64, ``spacing (3,)`` mm.
    """
    from voxelopt.transform import resize_volume

    if image.shape != label.shape:
        raise ValueError(
            f"label {label.path} has shape {label.shape} but its image {image.path} has "
            f"{image.shape}"
        )
    image, label = downsample_volume(image, downsample), downsample_volume(label, downsample, True)
    if spacing_mm is not None:  # the working grid of the command line, in millimetres
        from voxelopt.ct import AIR_HU
        from voxelopt.grid import resample_to_grid, working_grid, working_spacing

        grid = working_grid(image, working_spacing(image.shape, image.spacing, spacing_mm))
        image = resample_to_grid(image, grid, 1, AIR_HU)
        label = resample_to_grid(label, grid, 0, 0)
    image_t = torch.from_numpy(np.ascontiguousarray(image.data, dtype=np.float32))[None]
    label_t = torch.from_numpy(np.ascontiguousarray(label.data, dtype=np.int64))[None]
    spacing_t = torch.tensor(image.spacing, dtype=torch.float64)
    if clip_hu is not None:
        image_t = image_t.clamp(float(clip_hu[0]), float(clip_hu[1]))
    if size is not None:
        if len(size) != 3 or any(int(n) < 2 for n in size):
            raise ValueError(f"size must be 3 integers >= 2, got {size!r}")
        target = [int(n) for n in size]
        old = image_t.shape[1:]
        image_t = resize_volume(image_t[None], target)[0]
        label_t = _resize_labels(label_t, target)
        spacing_t = spacing_t * torch.tensor(
            [(n - 1) / (m - 1) if m > 1 else float(n) for n, m in zip(old, target, strict=True)],
            dtype=torch.float64,
        )
    return image_t, label_t, spacing_t.float()


def load_subject(
    subject,
    downsample: int = 1,
    clip_hu: tuple[float, float] | None = None,
    spacing_mm: float | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Read one subject's CT and labels onto the (optionally downsampled) working grid.

    Args:
        subject: a :class:`voxelopt.data.subjects.Subject`.
        downsample: integer factor (see the module docstring).
        clip_hu: optional ``(low, high)`` window in HU applied to the image.
        spacing_mm: working grid in mm or ``"auto"`` (see :func:`prepare_volume`).

    Returns:
        ``image (1, D, H, W)`` float32 HU, ``label (1, D, H, W)`` int64 and ``spacing (3,)``
        float32 in mm of the returned grid.
    """
    return prepare_volume(
        load_volume(subject.image),
        load_labels(subject.label),
        downsample,
        clip_hu,
        spacing_mm=spacing_mm,
    )
