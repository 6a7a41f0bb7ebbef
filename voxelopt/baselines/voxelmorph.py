"""VoxelMorph-style network: a 3D U-Net predicting a stationary velocity field.

After Balakrishnan et al. (IEEE TMI 2019) and Dalca et al. (MICCAI 2018, diffeomorphic
variant): the windowed fixed and moving images are concatenated, a U-Net (encoder 16-32-32-32,
decoder 32-32-32-32-32-16-16, LeakyReLU 0.2) predicts a velocity field, which is optionally
resampled to a coarser grid (``int_downsize``), integrated by scaling and squaring
(:func:`voxelopt.transform.integrate_velocity`) and resampled back.

Inputs of any size are padded (zeros, after windowing) to a multiple of ``2**depth`` and the
velocity is cropped back before integration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelopt.ct import HU_WINDOW
from voxelopt.features.base import check_image_pair
from voxelopt.features.intensity import window
from voxelopt.transform import integrate_velocity, resize_displacement

__all__ = ["UNet3d", "VoxelMorph"]


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)
    )


class UNet3d(nn.Module):
    """VoxelMorph's U-Net: one conv per level, max-pooling down, nearest upsampling up.

    Args:
        in_channels: input channels.
        encoder: channels of the encoder levels (each followed by a 2x max-pool).
        decoder: channels of the decoder convs; the first ``len(encoder)`` are followed by an
            upsampling and a skip concatenation, the rest run at full resolution.

    Shapes:
        ``(B, in_channels, D, H, W) -> (B, decoder[-1], D, H, W)``; ``D, H, W`` must be
        multiples of ``2 ** len(encoder)``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        encoder: Sequence[int] = (16, 32, 32, 32),
        decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
    ) -> None:
        super().__init__()
        if len(encoder) < 1 or len(decoder) < len(encoder):
            raise ValueError(
                f"need >= 1 encoder level and at least as many decoder convs, got encoder="
                f"{list(encoder)}, decoder={list(decoder)}"
            )
        self.depth = len(encoder)
        self.down = nn.ModuleList()
        prev = in_channels
        for ch in encoder:
            self.down.append(_conv(prev, ch))
            prev = ch
        self.up = nn.ModuleList()
        for level, ch in enumerate(decoder[: self.depth]):
            self.up.append(_conv(prev, ch))
            prev = ch + encoder[self.depth - 1 - level]
        self.extra = nn.Sequential(*[_conv(p, c) for p, c in _pairs(prev, decoder[self.depth :])])
        self.out_channels = decoder[-1] if len(decoder) > self.depth else prev

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for block in self.up:
            x = F.interpolate(block(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        return self.extra(x)


def _pairs(first: int, channels: Sequence[int]) -> list[tuple[int, int]]:
    prev, out = first, []
    for ch in channels:
        out.append((prev, ch))
        prev = ch
    return out


class VoxelMorph(nn.Module):
    """VoxelMorph-diff as a registration model.

    Args:
        encoder: U-Net encoder channels.
        decoder: U-Net decoder channels.
        integration_steps: scaling-and-squaring steps (0: the network's output is the
            displacement itself, the non-diffeomorphic VoxelMorph).
        int_downsize: the velocity is integrated on a grid ``int_downsize`` times coarser.
        init_std: standard deviation of the flow head's initial weights (VoxelMorph: 1e-5);
            0 starts from the exact identity.
        window_low: CT window lower bound (HU).
        window_high: CT window upper bound (HU).
    """

    def __init__(
        self,
        encoder: Sequence[int] = (16, 32, 32, 32),
        decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        integration_steps: int = 7,
        int_downsize: int = 2,
        init_std: float = 1e-5,
        window_low: float = HU_WINDOW[0],
        window_high: float = HU_WINDOW[1],
    ) -> None:
        super().__init__()
        if not isinstance(integration_steps, int) or integration_steps < 0:
            raise ValueError(
                f"integration_steps must be an integer >= 0, got {integration_steps!r}"
            )
        if not isinstance(int_downsize, int) or int_downsize < 1:
            raise ValueError(f"int_downsize must be an integer >= 1, got {int_downsize!r}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")
        if not window_low < window_high:
            raise ValueError(f"window_low must be < window_high, got {window_low}, {window_high}")
        self.unet = UNet3d(2, encoder, decoder)
        self.flow = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=init_std) if init_std > 0 else nn.init.zeros_(
            self.flow.weight
        )
        nn.init.zeros_(self.flow.bias)
        self.integration_steps = integration_steps
        self.int_downsize = int_downsize
        self.window = (float(window_low), float(window_high))

    def velocity(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        """The network's raw output on the input grid.

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` Hounsfield units.
            moving_hu: ``(B, 1, D, H, W)`` Hounsfield units on the same grid.

        Returns:
            ``(B, 3, D, H, W)`` velocity (or displacement if ``integration_steps == 0``) in
            voxels.
        """
        fixed_hu, moving_hu = check_image_pair(fixed_hu, moving_hu)
        x = torch.cat([window(fixed_hu, *self.window), window(moving_hu, *self.window)], dim=1)
        x = x.to(self.flow.weight.dtype)
        shape = x.shape[2:]
        unit = 2**self.unet.depth
        pad = []
        for n in reversed(shape):
            pad += [0, -(-n // unit) * unit - n]
        v = self.flow(self.unet(F.pad(x, pad)))
        return v[:, :, : shape[0], : shape[1], : shape[2]]

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        """Register ``moving_hu`` to ``fixed_hu``.

        Returns:
            ``(B, 3, D, H, W)`` displacement in voxels of the fixed grid,
            ``moved(x) = moving(x + u(x))``; differentiable with respect to the weights.
        """
        v = self.velocity(fixed_hu, moving_hu)
        if self.integration_steps == 0:
            return v
        shape = v.shape[2:]
        if self.int_downsize > 1:
            coarse = [max(2, -(-n // self.int_downsize)) for n in shape]
            v = resize_displacement(v, coarse)
        u = integrate_velocity(v, self.integration_steps)
        return resize_displacement(u, shape)
