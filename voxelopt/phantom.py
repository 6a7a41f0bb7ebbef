"""Synthetic data: an abdominal CT phantom, random smooth deformations and registration pairs.

The phantom is a set of ellipsoid organs with CT-like Hounsfield units, labelled in the
13-organ order of the paper's dataset (``voxelopt.ct.BTCV13_LABELS``). Its anatomy is
fixed in millimetres around the centre of the grid, so ``spacing`` changes the resolution and
``shape`` the field of view; axes follow the RAS+ array convention of ``voxelopt.io`` (axis 0
towards the patient's right, axis 1 anterior, axis 2 superior).

A synthetic pair follows the project's warping convention exactly: with ``u`` the true
displacement, ``fixed(x) = moving(x + u(x))``, i.e. ``u`` is the field a registration of
(fixed, moving) should return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from voxelopt.checks import check_shape3, check_spacing
from voxelopt.ct import AIR_HU, body_mask
from voxelopt.data.pair import Pair
from voxelopt.transform import integrate_velocity, resize_volume, warp

__all__ = [
    "make_pair",
    "make_phantom",
    "random_smooth_displacement",
]


# Half field of view (mm) of the default phantom grid (96, 80, 112) at 3 mm; organ positions
# and radii below are fractions of it.
_HALF_FOV_MM = (144.0, 120.0, 168.0)

# (label, centre (x right, y anterior, z superior), radii, HU); painted in this order.
_ORGANS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float], float], ...] = (
    (6, (0.40, 0.10, 0.45), (0.36, 0.45, 0.30), 60.0),  # liver
    (1, (-0.55, -0.15, 0.45), (0.16, 0.22, 0.20), 50.0),  # spleen
    (2, (0.32, -0.35, 0.00), (0.12, 0.13, 0.22), 150.0),  # right kidney (contrast)
    (3, (-0.32, -0.33, 0.05), (0.12, 0.13, 0.22), 150.0),  # left kidney (contrast)
    (7, (-0.30, 0.25, 0.45), (0.22, 0.20, 0.22), 25.0),  # stomach
    (4, (0.25, 0.38, 0.20), (0.07, 0.08, 0.10), 10.0),  # gallbladder (bile)
    (11, (-0.10, 0.05, 0.15), (0.28, 0.06, 0.06), 45.0),  # pancreas
    (10, (0.12, 0.02, 0.22), (0.10, 0.04, 0.04), 170.0),  # portal and splenic vein
    (9, (0.12, -0.28, 0.10), (0.06, 0.05, 0.80), 150.0),  # inferior vena cava
    (8, (-0.08, -0.32, 0.10), (0.055, 0.055, 0.85), 200.0),  # aorta
    (12, (-0.22, -0.30, 0.35), (0.04, 0.03, 0.06), 30.0),  # left adrenal
    (13, (0.22, -0.30, 0.35), (0.04, 0.03, 0.06), 30.0),  # right adrenal
    (5, (-0.05, -0.20, 0.82), (0.05, 0.05, 0.22), 40.0),  # esophagus
)


def make_phantom(
    shape: Sequence[int] = (96, 80, 112),
    spacing: float | Sequence[float] = 3.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic abdominal CT with organ labels.

    Air (-1000 HU) around an elliptic body with a fat layer (-100 HU) over soft tissue
    (40 HU), a spine (700 HU) with its canal, lung bases (-850 HU), and 13 ellipsoid organs
    (liver 60, spleen 50, contrast-enhanced kidneys 150, aorta 200, ...). ``seed`` jitters
    organ positions and sizes (a few percent) and draws a smooth texture plus white noise.

    Args:
        shape: ``(D, H, W)`` voxels.
        spacing: voxel size in mm (one number or one per axis).
        seed: random seed; the same seed gives the same phantom.

    Returns:
        ``hu``: ``(D, H, W)`` float32 Hounsfield units; ``labels``: ``(D, H, W)`` int64
        labels in the 13-organ order (0 = background).
    """
    shape, spacing = check_shape3(shape), check_spacing(spacing)
    rng = np.random.default_rng(seed)
    axes = [
        (np.arange(n) - (n - 1) / 2.0) * s / h
        for n, s, h in zip(shape, spacing, _HALF_FOV_MM, strict=True)
    ]
    x, y, z = np.meshgrid(*axes, indexing="ij")

    hu = np.full(shape, AIR_HU, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.int64)
    body = (x / 0.9) ** 2 + (y / 0.72) ** 2 <= 1.0
    inner = (x / 0.83) ** 2 + (y / 0.65) ** 2 <= 1.0
    hu[body] = -100.0
    hu[inner] = 40.0
    for side in (-1.0, 1.0):
        lung = ((x - 0.42 * side) / 0.33) ** 2 + ((y + 0.1) / 0.42) ** 2 + (
            (z - 1.05) / 0.28
        ) ** 2 <= 1.0
        hu[lung & inner] = -850.0
    spine = (x / 0.11) ** 2 + ((y + 0.5) / 0.11) ** 2 <= 1.0
    canal = (x / 0.04) ** 2 + ((y + 0.56) / 0.04) ** 2 <= 1.0
    hu[spine] = 700.0
    hu[canal] = 20.0

    for label, centre, radii, value in _ORGANS:
        c = np.asarray(centre) + rng.uniform(-0.02, 0.02, 3)
        r = np.asarray(radii) * rng.uniform(0.95, 1.05, 3)
        mask = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
        mask = (mask <= 1.0) & inner & ~spine
        hu[mask] = value
        labels[mask] = label

    # smooth texture (~6 mm correlation) inside the body, then white noise
    sigma = [6.0 / s for s in spacing]
    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="nearest")
    texture *= 8.0 / max(float(texture.std()), 1e-6)
    hu[body] += texture[body] + rng.normal(0.0, 5.0, size=int(body.sum()))
    return hu.astype(np.float32), labels


def _as_generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def _max_magnitude(disp: Tensor, scale: Tensor) -> Tensor:
    """``(B,)`` largest vector length of ``disp * scale`` (``scale`` ``(1, 3, 1, 1, 1)``)."""
    return (disp * scale).norm(dim=1).flatten(1).amax(dim=1)


def random_smooth_displacement(
    shape: Sequence[int],
    max_displacement: float,
    control_spacing: float = 8.0,
    seed: int | torch.Generator | None = 0,
    batch: int = 1,
    diffeomorphic: bool = False,
    spacing: float | Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random smooth displacement field with a given largest magnitude.

    Standard normal vectors on a coarse control grid (one point every ``control_spacing``
    voxels, corners included) are upsampled trilinearly (``voxelopt.transform.resize_volume``)
    and scaled so that the largest vector has length ``max_displacement``. With
    ``diffeomorphic=True`` that field is a stationary velocity integrated by scaling and
    squaring; the velocity is rescaled (a few fixed-point steps) so that the integrated field's
    largest vector matches ``max_displacement`` to within about 1 %.

    Args:
        shape: ``(D, H, W)``.
        max_displacement: largest vector length, in voxels (in mm if ``spacing`` is given).
        control_spacing: distance between control points, in voxels (mm if ``spacing`` given).
        seed: int seed or a ``torch.Generator`` (CPU); same seed, same field.
        batch: number of independent fields ``B``.
        diffeomorphic: integrate as a velocity field (no folding for moderate amplitudes).
        spacing: voxel size in mm; when given, magnitudes are measured in mm.
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        ``(B, 3, D, H, W)`` displacement in voxels.
    """
    shape = check_shape3(shape)
    if not max_displacement >= 0:
        raise ValueError(f"max_displacement must be >= 0, got {max_displacement}")
    if not control_spacing > 0:
        raise ValueError(f"control_spacing must be > 0, got {control_spacing}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    mm = check_spacing(spacing) if spacing is not None else (1.0, 1.0, 1.0)
    scale = torch.tensor(mm, dtype=torch.float64).view(1, 3, 1, 1, 1)
    coarse = tuple(
        max(2, math.ceil((n - 1) * s / control_spacing) + 1) for n, s in zip(shape, mm, strict=True)
    )
    gen = _as_generator(seed)
    ctrl = torch.randn((batch, 3, *coarse), generator=gen, dtype=torch.float64)
    field = resize_volume(ctrl, shape) / scale  # voxels; magnitudes measured in mm below
    if max_displacement == 0:
        return torch.zeros_like(field, dtype=dtype, device=device)
    target = float(max_displacement)
    field = field * (target / _max_magnitude(field, scale)).view(-1, 1, 1, 1, 1)
    if diffeomorphic:
        velocity = field
        for _ in range(6):
            field = integrate_velocity(velocity)
            ratio = target / _max_magnitude(field, scale)
            if torch.all((ratio - 1).abs() < 1e-3):
                break
            velocity = velocity * ratio.view(-1, 1, 1, 1, 1)
        field = integrate_velocity(velocity)
    return field.to(dtype=dtype, device=device)


def _volume_tensor(x, name: str, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.dim() != 3:
        raise ValueError(f"{name} must be (D, H, W), got shape {tuple(t.shape)}")
    return t.to(dtype).reshape(1, 1, *t.shape)


def make_pair(
    hu,
    labels,
    max_displacement_mm: float,
    spacing: float | Sequence[float],
    seed: int = 0,
    intensity_change: bool = True,
    control_spacing_mm: float = 40.0,
    diffeomorphic: bool = True,
    bias_hu: float = 30.0,
    noise_hu: float = 10.0,
) -> Pair:
    """Make a synthetic pair from one image and its labels by a known smooth deformation.

    The given image is the moving image; the fixed image is it warped by the true field
    ``u``: ``fixed_hu = warp(hu, u)`` (trilinear, border padding) and
    ``fixed_labels = warp(labels, u, "nearest")`` (exact copies when
    ``max_displacement_mm == 0``). With ``intensity_change`` the moving image
    additionally gets a smooth additive bias (up to ``bias_hu``) inside the body (> -500 HU)
    and white noise (``noise_hu``), drawn from the same seed.

    Args:
        hu: ``(D, H, W)`` HU image (numpy or torch).
        labels: ``(D, H, W)`` integer labels on the same grid.
        max_displacement_mm: largest displacement of the true field, mm.
        spacing: voxel size in mm (one number or one per axis).
        seed: random seed; the same seed gives the same pair.
        intensity_change: perturb the moving intensities.
        control_spacing_mm: control-point distance of the random field, mm.
        diffeomorphic: draw the field as an integrated velocity (no folding).
        bias_hu: amplitude of the smooth intensity bias, HU.
        noise_hu: standard deviation of the white noise, HU.

    Returns:
        :class:`~voxelopt.data.pair.Pair` with its true field (``true_disp``).
    """
    moving = _volume_tensor(hu, "hu", torch.float32)
    moving_labels = _volume_tensor(labels, "labels", torch.int64)
    if moving.shape != moving_labels.shape:
        raise ValueError(
            f"hu and labels differ in shape: {tuple(moving.shape[2:])} vs "
            f"{tuple(moving_labels.shape[2:])}"
        )
    spacing = check_spacing(spacing)
    shape = tuple(moving.shape[2:])
    gen = _as_generator(seed)
    disp = random_smooth_displacement(
        shape,
        max_displacement_mm,
        control_spacing=control_spacing_mm,
        seed=gen,
        diffeomorphic=diffeomorphic,
        spacing=spacing,
    )
    if max_displacement_mm == 0:  # exact copies (a zero-field warp is only float-exact)
        fixed, fixed_labels = moving.clone(), moving_labels.clone()
    else:
        fixed = warp(moving, disp, padding_mode="border")
        fixed_labels = warp(moving_labels, disp, mode="nearest", padding_mode="border")
    moving_out = moving
    if intensity_change:
        bias = random_smooth_displacement(
            shape, 1.0, control_spacing=2 * control_spacing_mm, seed=gen, spacing=spacing
        )[:, :1]
        noise = torch.randn(moving.shape, generator=gen) * noise_hu
        moving_out = moving + bias * bias_hu * body_mask(moving).float() + noise
    return Pair(
        fixed_hu=fixed,
        moving_hu=moving_out,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        spacing=spacing,
        true_disp=disp,
        name=f"seed{seed}" if isinstance(seed, int) else "synthetic",
    )
