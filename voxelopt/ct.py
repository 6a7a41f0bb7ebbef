"""CT conventions in Hounsfield units: the one place for air, body threshold and window.

Every module that needs a CT constant imports it from here, so that the window the features
use, the air value used to fill outside a field of view and the body threshold that masks
the endpoint error agree everywhere.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["AIR_HU", "BODY_HU", "BTCV13_LABELS", "HU_WINDOW", "body_mask"]

#: Hounsfield units of air: the value outside a scan's field of view.
AIR_HU: float = -1000.0

#: A voxel above this many HU counts as body (fat is about -100, lung about -800).
BODY_HU: float = -500.0

#: The reference implementation's intensity window ``(low, high)`` in HU: clip, then scale
#: to ``[0, 1]`` (raw, MIND and Universal-Model features, the baselines).
HU_WINDOW: tuple[float, float] = (-500.0, 800.0)


def body_mask(image_hu: Tensor, threshold: float = BODY_HU) -> Tensor:
    """Boolean mask of the body: voxels above ``threshold`` HU.

    Args:
        image_hu: CT of any shape, e.g. ``(B, 1, D, H, W)``, in HU.
        threshold: HU above which a voxel counts as body.

    Returns:
        Boolean tensor of the same shape.
    """
    return image_hu > threshold


#: The 13 abdominal organs of the paper's dataset (BTCV / AbdomenCTCT), in label order
#: (``docs/method.md``); 0 is background.
BTCV13_LABELS: dict[int, str] = {
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_splenic_vein",
    11: "pancreas",
    12: "left_adrenal",
    13: "right_adrenal",
}
