"""The pair of ``voxelopt demo``: a phantom (or a real CT) and a smoothly deformed copy.

:func:`write_demo_inputs` writes both images and their label maps as NIfTI into the run's
staging folder (``inputs/``), so they become part of the run's one complete set of outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voxelopt.io import Volume, check_same_grid, load_labels, load_volume, save_volume
from voxelopt.outputs import StagedOutput

__all__ = ["DEMO_SPACING_MM", "demo_pair", "write_demo_inputs"]

#: Voxel size of the phantom (mm).
DEMO_SPACING_MM = (3.0, 3.0, 3.0)


def demo_pair(
    shape=(96, 80, 112),
    seed: int = 0,
    max_displacement_mm: float = 20.0,
    ct: str | Path | None = None,
    ct_labels: str | Path | None = None,
):
    """The demo's :class:`~voxelopt.phantom.Pair` and the grid to write it on.

    Args:
        shape: ``(D, H, W)`` of the phantom (ignored with ``ct``).
        seed: seed of the phantom and of the deformation.
        max_displacement_mm: largest displacement of the synthetic deformation.
        ct: make the pair from this CT file instead of the phantom.
        ct_labels: label map of ``ct`` (on its grid).

    Returns:
        ``(pair, like)``: the pair and a :class:`~voxelopt.io.Volume` with the grid.
    """
    from voxelopt.phantom import make_pair, make_phantom

    if ct is not None:
        like = load_volume(ct)
        labels = np.zeros(like.shape, np.int64)
        if ct_labels is not None:
            labels_volume = load_labels(ct_labels)
            check_same_grid(labels_volume, like, ("--ct-labels", "--ct"))
            labels = labels_volume.data
        hu, spacing = like.data, like.spacing
    else:
        if ct_labels is not None:
            raise ValueError("--ct-labels needs --ct")
        spacing = DEMO_SPACING_MM
        hu, labels = make_phantom(tuple(shape), spacing=spacing, seed=seed)
        ornt = np.array([[0, 1], [1, 1], [2, 1]])
        like = Volume(np.zeros(hu.shape, np.float32), np.diag([*spacing, 1.0]), ornt)
    pair = make_pair(
        hu, labels, max_displacement_mm=max_displacement_mm, spacing=spacing, seed=seed
    )
    return pair, like


def write_demo_inputs(out: StagedOutput, **kwargs) -> tuple[dict, dict, float | None]:
    """Make the demo pair and write it into ``out``'s ``inputs/`` folder.

    Args:
        out: the run's staged output folder.
        **kwargs: arguments of :func:`demo_pair`.

    Returns:
        ``(staged, final, initial_dice)``: for ``fixed``, ``moving``, ``fixed_labels`` and
        ``moving_labels`` the path written in the staging folder and the path it will have in
        ``OUT`` (the label maps only when there are labels: not for a CT without
        ``ct_labels``); the mean Dice of the pair before registration (``None`` without
        labels).
    """
    from voxelopt.metrics import dice, mean_over_labels

    pair, like = demo_pair(**kwargs)
    out.path("inputs").mkdir()
    labelled = bool(pair.moving_labels.any())  # a CT without --ct-labels has none
    names = ("fixed", "moving") + (("fixed_labels", "moving_labels") if labelled else ())
    staged, final = {}, {}
    for name in names:
        data = np.asarray(getattr(pair, name if "labels" in name else f"{name}_hu")[0, 0])
        dtype = np.int16 if "labels" in name else np.float32
        staged[name] = save_volume(data, like, out.path(f"inputs/{name}.nii.gz"), dtype=dtype)
        final[name] = out.final_path(f"inputs/{name}.nii.gz")
    if not labelled:
        return staged, final, None
    initial = mean_over_labels(dice(pair.moving_labels[0, 0], pair.fixed_labels[0, 0]))
    return staged, final, float(initial)
