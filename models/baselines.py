"""Training glue for the learned baselines (VoxelMorph) on the project's RegistrationModule.

:class:`models.registration.RegistrationModule` trains any registration model with any
:class:`models.losses.RegistrationLoss`; VoxelMorph needs nothing more except its
semi-supervised loss, image similarity plus label Dice (Balakrishnan et al., IEEE TMI 2019,
"auxiliary segmentation"), which lives here. Use it in YAML as
``class_path: models.baselines.SemiSupervisedLoss`` (see
``configs/baseline_voxelmorph_semisup.yaml``).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from models.losses import ImageSimilarityLoss, LabelDiceLoss, RegistrationLoss

__all__ = ["SemiSupervisedLoss"]


class SemiSupervisedLoss(RegistrationLoss):
    """Image similarity + ``dice_weight`` x (1 - soft label Dice) + diffusion smoothness.

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
