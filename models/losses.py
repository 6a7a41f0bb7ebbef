"""Training losses for end-to-end fine-tuning through the soft-argmin solver.

Every loss is an ``nn.Module`` called as ``loss(batch, displacement) -> (total, parts)``:
``batch`` is a pair batch of :mod:`models.data` (``fixed``, ``moving`` in HU,
``fixed_label``, ``moving_label``), ``displacement`` the model's ``(B, 3, D, H, W)`` field in
voxels, ``total`` a scalar to minimise and ``parts`` its named terms for logging. Pick one in
YAML with ``class_path: models.losses.LabelDiceLoss`` (semi-supervised) or
``models.losses.ImageSimilarityLoss`` (unsupervised).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelopt.transform import check_displacement, warp

__all__ = [
    "SemiSupervisedLoss",
    "ImageSimilarityLoss",
    "LabelDiceLoss",
    "RegistrationLoss",
    "diffusion_regularizer",
    "local_ncc",
    "one_hot",
    "soft_dice",
]


def one_hot(label: Tensor, num_labels: int) -> Tensor:
    """``(B, 1, D, H, W)`` integer labels -> ``(B, num_labels + 1, D, H, W)`` float one-hot.

    Labels above ``num_labels`` are counted as background.
    """
    if label.dim() != 5 or label.shape[1] != 1:
        raise ValueError(f"label must have shape (B, 1, D, H, W), got {tuple(label.shape)}")
    label = label.long()
    label = torch.where((label < 0) | (label > num_labels), torch.zeros_like(label), label)
    return F.one_hot(label[:, 0], num_labels + 1).permute(0, 4, 1, 2, 3).float()


def soft_dice(fixed: Tensor, moved: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean soft Dice over the foreground channels present in either volume.

    Args:
        fixed: ``(B, L + 1, D, H, W)`` one-hot (or probabilities); channel 0 = background.
        moved: same shape, e.g. warped one-hot moving labels.
        eps: added to the denominator.

    Returns:
        Scalar mean Dice in ``[0, 1]`` over (batch, present label) entries.
    """
    dims = (2, 3, 4)
    inter = (fixed[:, 1:] * moved[:, 1:]).sum(dims)
    total = fixed[:, 1:].sum(dims) + moved[:, 1:].sum(dims)
    present = total > 0
    if not bool(present.any()):
        return fixed.new_ones(())
    dice = 2 * inter / (total + eps)
    return dice[present].mean()


def diffusion_regularizer(disp: Tensor) -> Tensor:
    """Diffusion smoothness: mean over voxels of ``||grad u||_F^2`` (forward differences).

    The 9 squared partial derivatives ``(d u_i / d x_j)^2`` are summed per voxel and averaged.

    Args:
        disp: ``(B, 3, D, H, W)`` displacement in voxels.

    Returns:
        Scalar, in voxels^2 per voxel^2.
    """
    check_displacement(disp)
    terms = [disp.diff(dim=axis).pow(2).sum(1).mean() for axis in (2, 3, 4) if disp.shape[axis] > 1]
    return torch.stack(terms).sum() if terms else disp.new_zeros(())


def local_ncc(a: Tensor, b: Tensor, window: int = 5, eps: float = 1e-5) -> Tensor:
    """Mean local normalised cross-correlation over cubic windows (squared, VoxelMorph style).

    Args:
        a: ``(B, 1, D, H, W)`` image.
        b: ``(B, 1, D, H, W)`` image on the same grid.
        window: side of the cubic window (odd).
        eps: added to the variances.

    Returns:
        Scalar in ``[0, 1]``; 1 for locally affinely related images.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")

    def pool(t: Tensor) -> Tensor:  # local means over the voxels inside the volume
        return F.avg_pool3d(t, window, 1, window // 2, count_include_pad=False)

    mean_a, mean_b = pool(a), pool(b)
    cov = pool(a * b) - mean_a * mean_b
    var_a = (pool(a * a) - mean_a**2).clamp_min(0)
    var_b = (pool(b * b) - mean_b**2).clamp_min(0)
    return (cov * cov / (var_a * var_b + eps)).mean()


class RegistrationLoss(nn.Module):
    """Base: a data term plus ``smoothness`` times the diffusion regulariser.

    Args:
        smoothness: weight of :func:`diffusion_regularizer` (>= 0).
    """

    def __init__(self, smoothness: float = 0.0) -> None:
        super().__init__()
        if not smoothness >= 0:
            raise ValueError(f"smoothness must be >= 0, got {smoothness!r}")
        self.smoothness = float(smoothness)

    def data_term(self, batch: dict, displacement: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the data loss (to minimise) and named values to log."""
        raise NotImplementedError

    def forward(self, batch: dict, displacement: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its parts.

        Args:
            batch: pair batch (see :mod:`models.data`).
            displacement: ``(B, 3, D, H, W)`` in voxels, ``moved = warp(moving, u)``.

        Returns:
            ``(total, parts)``: scalar loss and a dict of detached scalars.
        """
        check_displacement(displacement)
        loss, parts = self.data_term(batch, displacement)
        if self.smoothness > 0:
            reg = diffusion_regularizer(displacement)
            loss = loss + self.smoothness * reg
            parts["smoothness"] = reg.detach()
        return loss, parts


class LabelDiceLoss(RegistrationLoss):
    """Semi-supervised: ``1 - soft Dice`` of the warped one-hot moving labels and the fixed ones.

    Args:
        num_labels: number of foreground labels (13 organs).
        smoothness: weight of the diffusion regulariser.
    """

    def __init__(self, num_labels: int = 13, smoothness: float = 0.0) -> None:
        super().__init__(smoothness)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels

    def data_term(self, batch: dict, displacement: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        for key in ("fixed_label", "moving_label"):
            if key not in batch:
                raise ValueError(f"LabelDiceLoss needs batch[{key!r}] (a labelled dataset)")
        fixed = one_hot(batch["fixed_label"], self.num_labels).to(displacement.dtype)
        moving = one_hot(batch["moving_label"], self.num_labels).to(displacement.dtype)
        dice = soft_dice(fixed, warp(moving, displacement))
        return 1 - dice, {"soft_dice": dice.detach()}


class ImageSimilarityLoss(RegistrationLoss):
    """Unsupervised: dissimilarity of the warped moving image and the fixed image.

    Images are windowed to ``window_hu`` and scaled to ``[0, 1]`` first.

    Args:
        similarity: ``"ncc"`` (``1 - local NCC``) or ``"mse"``.
        window_hu: ``(low, high)`` HU window.
        ncc_window: side of the NCC window (odd).
        smoothness: weight of the diffusion regulariser.
    """

    def __init__(
        self,
        similarity: Literal["ncc", "mse"] = "ncc",
        window_hu: tuple[float, float] = (-500.0, 800.0),
        ncc_window: int = 5,
        smoothness: float = 1.0,
    ) -> None:
        super().__init__(smoothness)
        if similarity not in ("ncc", "mse"):
            raise ValueError(f"similarity must be 'ncc' or 'mse', got {similarity!r}")
        if not window_hu[0] < window_hu[1]:
            raise ValueError(f"window_hu must be (low, high) with low < high, got {window_hu!r}")
        if ncc_window < 1 or ncc_window % 2 == 0:
            raise ValueError(f"ncc_window must be a positive odd integer, got {ncc_window}")
        self.similarity = similarity
        self.window_hu = (float(window_hu[0]), float(window_hu[1]))
        self.ncc_window = ncc_window

    def _scale(self, image: Tensor) -> Tensor:
        low, high = self.window_hu
        return (image.clamp(low, high) - low) / (high - low)

    def data_term(self, batch: dict, displacement: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        fixed = self._scale(batch["fixed"].to(displacement.dtype))
        moved = warp(self._scale(batch["moving"].to(displacement.dtype)), displacement)
        if self.similarity == "mse":
            mse = (fixed - moved).pow(2).mean()
            return mse, {"mse": mse.detach()}
        ncc = local_ncc(fixed, moved, self.ncc_window)
        return 1 - ncc, {"ncc": ncc.detach()}


class SemiSupervisedLoss(RegistrationLoss):
    """Image similarity + ``dice_weight`` x (1 - soft label Dice) + diffusion smoothness.

    VoxelMorph's semi-supervised loss ("auxiliary segmentation", Balakrishnan et al., IEEE TMI
    2019), used by ``configs/baseline_voxelmorph_semisup.yaml``.

    Args:
        similarity: ``"ncc"`` (1 - local NCC) or ``"mse"`` of the windowed images.
        window_hu: ``(low, high)`` HU window of the image term.
        ncc_window: side of the local NCC window (odd, voxels).
        dice_weight: weight of the label term (>= 0).
        num_labels: foreground labels ``1..num_labels`` of the label term.
        smoothness: weight of the diffusion regulariser.
    """

    def __init__(
        self,
        similarity: Literal["ncc", "mse"] = "ncc",
        window_hu: tuple[float, float] = (-500.0, 800.0),
        ncc_window: int = 9,
        dice_weight: float = 1.0,
        num_labels: int = 13,
        smoothness: float = 1.0,
    ) -> None:
        super().__init__(smoothness)
        if not dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight!r}")
        self.image = ImageSimilarityLoss(similarity, window_hu, ncc_window, smoothness=0.0)
        self.labels = LabelDiceLoss(num_labels, smoothness=0.0)
        self.dice_weight = float(dice_weight)

    def data_term(self, batch: dict, displacement: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        image, parts = self.image.data_term(batch, displacement)
        labels, label_parts = self.labels.data_term(batch, displacement)
        parts.update(label_parts)
        parts["image_term"] = image.detach()
        parts["label_term"] = labels.detach()
        return image + self.dice_weight * labels, parts
