"""Input checks: the one module every layer validates its inputs with.

In the spirit of kornia's ``core/check.py``: each ``check_*`` function raises ``TypeError``
(wrong kind of object or dtype) or ``ValueError`` (wrong shape or value) with a one-line message
that names the argument and what was wrong, and returns the (possibly normalised) value. The
vocabulary is the same everywhere: ``"<name> must <rule>, got <what was given>"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_volume_tensor",
    "check_displacement",
    "check_features",
    "check_image",
    "check_image_pair",
    "check_label_array",
    "check_positive_int",
    "check_shape3",
    "check_spacing",
]


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum`` (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_spacing(spacing: float | Sequence[float], name: str = "spacing") -> tuple[float, ...]:
    """Voxel size in mm: one positive number or three, returned as a 3-tuple of floats."""
    if isinstance(spacing, Tensor):
        spacing = spacing.tolist()
    if isinstance(spacing, (int, float, np.number)):
        spacing = (float(spacing),) * 3
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ValueError(f"{name} must be a positive number or 3 positive numbers, got {spacing}")
    return spacing


def check_shape3(shape: Sequence[int], name: str = "shape", minimum: int = 2) -> tuple[int, ...]:
    """A ``(D, H, W)`` grid size with every size ``>= minimum``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < minimum for s in shape):
        raise ValueError(f"{name} must be (D, H, W) with every size >= {minimum}, got {shape}")
    return shape


def _check_tensor5(x: Tensor, name: str, channels: int | None, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got {x.dtype}")
    if x.dim() != 5 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_image(image: Tensor, name: str = "image_hu") -> Tensor:
    """Validate a ``(B, 1, D, H, W)`` image and return it as a floating tensor.

    Args:
        image: ``(B, 1, D, H, W)`` tensor, any real dtype (integers are cast to the default
            floating dtype).
        name: name of the argument used in error messages.

    Returns:
        The image, floating point.

    Raises:
        TypeError: if ``image`` is not a tensor or is complex/boolean.
        ValueError: if the shape is not ``(B, 1, D, H, W)`` or a value is not finite.
    """
    _check_tensor5(image, name, 1, "(B, 1, D, H, W)")
    if not image.is_floating_point():
        image = image.to(torch.get_default_dtype())
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return image


def check_image_pair(fixed_hu: Tensor, moving_hu: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a fixed/moving pair of ``(B, 1, D, H, W)`` images on the same grid.

    Returns:
        Both images, floating point (see :func:`check_image`).

    Raises:
        ValueError: naming the two shapes when they differ.
    """
    fixed_hu = check_image(fixed_hu, "fixed_hu")
    moving_hu = check_image(moving_hu, "moving_hu")
    if fixed_hu.shape != moving_hu.shape:
        raise ValueError(
            f"fixed_hu and moving_hu shapes differ: {tuple(fixed_hu.shape)} vs "
            f"{tuple(moving_hu.shape)}; resample the moving image onto the fixed grid first"
        )
    return fixed_hu, moving_hu


def check_features(feat: Tensor, name: str) -> None:
    """Raise unless ``feat`` is a non-empty floating ``(B, C, D, H, W)`` tensor."""
    _check_tensor5(feat, name, None, "(B, C, D, H, W)")
    if not feat.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {feat.dtype}")


def check_displacement(disp: Tensor, name: str = "displacement") -> None:
    """Raise unless ``disp`` is a ``(B, 3, D, H, W)`` floating tensor (voxels)."""
    if not isinstance(disp, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(disp).__name__}")
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, D, H, W), got {tuple(disp.shape)}")
    if not disp.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {disp.dtype}")


def check_label_array(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    """An integer label map of any shape as a numpy array (integral floats are accepted).

    Raises:
        TypeError: not an array/tensor, or of a non-integer dtype.
        ValueError: floating values that are not integers.
    """
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
            raise ValueError(f"{name} must hold integer labels, got non-integer values")
        x = x.astype(np.int64)
    elif x.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    return x


def as_volume_tensor(x, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """A ``(D, H, W)`` array or tensor (or ``(1, 1, D, H, W)``) as a ``(1, 1, D, H, W)`` tensor.

    Raises:
        TypeError: not a numpy array or tensor.
        ValueError: not 3-D, or NaN/Inf voxels in a floating volume.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dim() == 5 and x.shape[:2] == (1, 1):
        x = x[0, 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be a 3-D volume (D, H, W), got shape {tuple(x.shape)}")
    x = x.to(dtype)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf voxels")
    return x[None, None]


# --- inputs of the command line and the file pipeline (appended below) -------------------

#: More distinct values than this in a label map means it is an image given as labels (a CT
#: has thousands of distinct HU values; TotalSegmentator, the largest common CT label set,
#: has 117 labels).
MAX_LABELS = 1000


def check_label_values(labels: np.ndarray, name: str, max_labels: int = MAX_LABELS) -> int:
    """Raise unless an integer array looks like a label map; return its number of labels.

    A label map holds 0 (background) and positive integers, and not more than ``max_labels``
    distinct values: negative values or thousands of values mean an image was given as labels.

    Args:
        labels: integer array of any shape.
        name: how to name it in messages (e.g. ``"--fixed-labels"``).
        max_labels: most distinct values (background included) accepted.

    Returns:
        The number of distinct non-zero labels.

    Raises:
        ValueError: naming the smallest value or the number of distinct values.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(
            f"{name} must hold labels >= 0 (0 = background), got values down to {low}: "
            "is it an image rather than a label map?"
        )
    if high <= 10 * max_labels:
        # order "K": no C-ordered copy of a Fortran-ordered NIfTI array (0.4 s at 35 M voxels)
        distinct = int(np.count_nonzero(np.bincount(labels.ravel(order="K"), minlength=1)))
    else:
        distinct = int(np.unique(labels).size)
    if distinct > max_labels:
        raise ValueError(
            f"{name} must hold at most {max_labels} distinct labels, got {distinct}: "
            "is it an image rather than a label map?"
        )
    return distinct - int(low == 0)


def world_box(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(2, 3)`` world-space bounding box (mm) of a grid: min and max corner of its voxels.

    Voxels are boxes of one voxel size around their centres, so the box reaches half a voxel
    beyond the first and last centres.
    """
    affine = np.asarray(affine, dtype=np.float64)
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij"))
    corners = corners.reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return np.stack([world.min(axis=1), world.max(axis=1)])


def check_world_overlap(
    fixed_affine: np.ndarray,
    fixed_shape: Sequence[int],
    moving_affine: np.ndarray,
    moving_shape: Sequence[int],
    names: tuple[str, str] = ("fixed", "moving"),
) -> float:
    """Raise unless two grids overlap in world space; return the overlap's share of fixed.

    Args:
        fixed_affine: ``(4, 4)`` voxel -> world (mm) matrix of the fixed image.
        fixed_shape: its ``(D, H, W)``.
        moving_affine: the moving image's matrix.
        moving_shape: its ``(D, H, W)``.
        names: how to name them in the message.

    Returns:
        Volume of the intersection of the two bounding boxes over the fixed box's volume.

    Raises:
        ValueError: the boxes do not intersect (with both boxes in mm).
    """
    a, b = world_box(fixed_affine, fixed_shape), world_box(moving_affine, moving_shape)
    extent = np.minimum(a[1], b[1]) - np.maximum(a[0], b[0])
    if np.any(extent <= 0):

        def box(x: np.ndarray) -> str:
            return " x ".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in zip(x[0], x[1], strict=True))

        raise ValueError(
            f"{names[0]} and {names[1]} do not overlap in world space: {names[0]} spans "
            f"{box(a)} mm, {names[1]} {box(b)} mm (check the origins in the files' headers, "
            "or let --affine affine search for the overlap)"
        )
    return float(np.prod(extent) / np.prod(a[1] - a[0]))


def check_pyramid_fits(
    shape: Sequence[int],
    levels: int,
    min_size: int,
    levels_name: str = "levels",
    grid_name: str = "spacing",
) -> None:
    """Raise unless a working grid of ``shape`` has ``levels`` levels of ``>= min_size`` voxels.

    The pyramid halves the grid per level (rounding up); its coarsest level must keep at
    least ``min_size`` voxels per axis (or the whole axis where the grid itself is smaller).

    Args:
        shape: ``(D, H, W)`` working grid.
        levels: pyramid levels.
        min_size: voxels per axis the coarsest level needs.
        levels_name: the option that sets ``levels`` (named in the message).
        grid_name: the option that sets the working grid (named when even 1 level is too few).

    Raises:
        ValueError: naming the coarsest level, the largest usable ``levels`` and the option.
    """
    shape = tuple(int(s) for s in shape)
    if min(shape) < min_size:
        raise ValueError(
            f"the working grid {'x'.join(map(str, shape))} is smaller than the pyramid needs "
            f"(at least {min_size} voxels per axis): use a finer {grid_name}"
        )
    coarsest, usable = shape, 0
    for level in range(levels):
        if level:
            coarsest = tuple((s + 1) // 2 for s in coarsest)
        if min(coarsest) < min_size:
            raise ValueError(
                f"{levels_name} {levels} makes the coarsest level {'x'.join(map(str, coarsest))} "
                f"voxels for the working grid {'x'.join(map(str, shape))} (at least {min_size} "
                f"per axis needed): use {levels_name} {usable} or less, or a finer {grid_name}"
            )
        usable = level + 1


__all__ += ["MAX_LABELS", "check_label_values", "check_pyramid_fits", "check_world_overlap"]
__all__ += ["world_box"]
