"""Registration metrics: label overlap, surface distance, Jacobian statistics, endpoint error.

One file per metric family, each a functional core on plain tensors and arrays (MONAI's
habit); :func:`voxelopt.evaluation.score_registration` combines them into the scores of one
registered pair, and :class:`~voxelopt.metrics.aggregate.RegistrationMetrics` (torchmetrics,
imported only when first used) aggregates those over pairs and DDP ranks.

Conventions:

* A label absent from **both** images is left out of Dice and HD95 (not counted as 1 or 0).
* HD95 of a label present in only one image is ``nan`` and is excluded from means.
* Means over labels or pairs ignore ``nan``; the mean of nothing is ``nan``.
"""

from __future__ import annotations

from voxelopt.ct import BTCV13_LABELS
from voxelopt.metrics.endpoint import endpoint_error
from voxelopt.metrics.jacobian import jacobian_determinant, nonpositive_jacobian_fraction, sdlogj
from voxelopt.metrics.overlap import dice, dice_per_label, mean_over_labels
from voxelopt.metrics.surface import hd95

__all__ = [
    "BTCV13_LABELS",
    "RegistrationMetrics",
    "dice",
    "dice_per_label",
    "endpoint_error",
    "hd95",
    "jacobian_determinant",
    "mean_over_labels",
    "nonpositive_jacobian_fraction",
    "sdlogj",
]


def __getattr__(name: str):
    # torchmetrics (and through it scipy.signal and matplotlib) only when the aggregator is used
    if name == "RegistrationMetrics":
        from voxelopt.metrics.aggregate import RegistrationMetrics

        return RegistrationMetrics
    raise AttributeError(f"module 'voxelopt.metrics' has no attribute {name!r}")
