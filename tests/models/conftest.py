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


def blob_volume(shape=(16, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth CT-like volume with two organs (labels 1 and 6), for synthetic pairs."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    organ1 = ((grid - np.array([0.3, 0.0, 0.1]).reshape(3, 1, 1, 1)) ** 2).sum(0) < 0.15
    organ6 = ((grid + np.array([0.3, 0.2, 0.0]).reshape(3, 1, 1, 1)) ** 2).sum(0) < 0.2
    image = np.full(shape, -100.0, np.float32) + 300.0 * np.sin(3 * grid[0]) * np.cos(2 * grid[1])
    image[organ1] = 200.0
    image[organ6] = 60.0
    label = np.zeros(shape, np.uint8)
    label[organ1] = 1
    label[organ6] = 6
    return image.astype(np.float32), label


@pytest.fixture
def synthetic_files(tmp_path) -> tuple[list[str], list[str]]:
    """One tiny base volume (16^3, 4 mm) and its labels as NIfTI files."""
    image, label = blob_volume()
    image_path = write_volume(tmp_path / "base_ct.nii.gz", image, spacing=(4.0, 4.0, 4.0))
    label_path = write_volume(tmp_path / "base_lab.nii.gz", label, spacing=(4.0, 4.0, 4.0))
    return [str(image_path)], [str(label_path)]
