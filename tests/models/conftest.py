"""Fixtures for the Lightning tests: tiny fake datasets in both on-disk layouts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

SHAPE = (12, 10, 8)


def write_volume(path: Path, data: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    """Write ``data`` as a RAS+ NIfTI with the given voxel size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


def fake_subject(sid: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like HU volume whose intensities encode the subject number, and a 2-organ label."""
    rng = np.random.default_rng(sid)
    image = (rng.normal(0.0, 20.0, shape) + 10.0 * sid - 500.0).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:5] = 1
    label[6:10, 4:8, 3:7] = 2
    return image, label


def make_paper_dataset(root: Path, ids=range(1, 31), shape=SHAPE) -> Path:
    for sid in ids:
        image, label = fake_subject(sid, shape)
        write_volume(root / "img" / f"img{sid:04d}.nii.gz", image)
        write_volume(root / "label" / f"label{sid:04d}.nii.gz", label)
    return root


def make_learn2reg_dataset(root: Path, ids=range(1, 31), shape=SHAPE, with_json=True) -> Path:
    entries = []
    for sid in ids:
        image, label = fake_subject(sid, shape)
        name = f"AbdomenCTCT_{sid:04d}_0000.nii.gz"
        write_volume(root / "imagesTr" / name, image)
        write_volume(root / "labelsTr" / name, label)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    if with_json:
        meta = {"name": "AbdomenCTCT", "training": entries[:20], "validation": entries[20:]}
        (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def fake_data():
    """The builders of this module, for tests that need a custom fake dataset."""
    return SimpleNamespace(
        shape=SHAPE,
        write_volume=write_volume,
        paper=make_paper_dataset,
        learn2reg=make_learn2reg_dataset,
    )


@pytest.fixture
def paper_dir(tmp_path) -> Path:
    return make_paper_dataset(tmp_path / "paper")


@pytest.fixture
def l2r_dir(tmp_path) -> Path:
    return make_learn2reg_dataset(tmp_path / "l2r")
