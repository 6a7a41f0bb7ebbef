"""Tests of voxelopt.visualize: valid, non-trivial PNGs written atomically."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from voxelopt.metrics import BTCV13_LABELS
from voxelopt.phantom import make_phantom
from voxelopt.visualize import save_comparison_figure, save_registration_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def phantom():
    hu, labels = make_phantom((16, 12, 20), 18.0)
    return hu, labels


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # images, not just text
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")] == []
    return img


def test_registration_figure(tmp_path, phantom):
    hu, labels = phantom
    moved = np.roll(hu, 1, axis=0)
    entropy = np.random.default_rng(0).random(hu.shape).astype(np.float32)
    path = save_registration_figure(
        tmp_path / "reg.png",
        torch.from_numpy(hu)[None, None],  # (1, 1, D, H, W) tensors are accepted
        hu,
        moved,
        entropy=entropy,
        fixed_labels=labels,
        moving_labels=labels,
        moved_labels=np.roll(labels, 1, axis=0),
        spacing=(18.0, 18.0, 18.0),
        title="phantom",
    )
    with_entropy = _check_png(path)
    plain = _check_png(save_registration_figure(tmp_path / "plain.png", hu, hu, moved))
    assert with_entropy.shape[1] > plain.shape[1]  # the entropy panel and its colour bar


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_registration_figure_axes(tmp_path, phantom, axis):
    hu, _ = phantom
    _check_png(save_registration_figure(tmp_path / f"a{axis}.png", hu, hu, hu, axis=axis, index=3))


def test_registration_figure_errors(tmp_path, phantom):
    hu, _ = phantom
    with pytest.raises(ValueError, match="moved has shape"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu[:-1])
    with pytest.raises(ValueError, match="D, H, W"):
        save_registration_figure(tmp_path / "x.png", hu[0], hu, hu)
    with pytest.raises(ValueError, match="index"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, index=99)
    with pytest.raises(ValueError, match="axis"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, axis=3)
    with pytest.raises(FileNotFoundError, match="folder"):
        save_registration_figure(tmp_path / "no" / "x.png", hu, hu, hu)
    assert not (tmp_path / "x.png").exists()


def test_comparison_figure(tmp_path, phantom):
    hu, _ = phantom
    dice = {
        "initial": {1: [0.3, 0.4, 0.5], 6: [0.6, 0.7], 2: [float("nan")]},
        "voxelopt": {1: [0.8, 0.85], 6: [0.9, 0.92, 0.95], 2: [0.7]},
    }
    path = save_comparison_figure(
        tmp_path / "cmp.png",
        hu,
        {"initial": hu, "voxelopt": np.roll(hu, 1, 0)},
        dice,
        label_names=BTCV13_LABELS,
    )
    _check_png(path)


def test_comparison_figure_errors(tmp_path, phantom):
    hu, _ = phantom
    with pytest.raises(ValueError, match="moved_by_method is empty"):
        save_comparison_figure(tmp_path / "x.png", hu, {}, {"a": {1: [0.5]}})
    with pytest.raises(ValueError, match="dice_per_organ is empty"):
        save_comparison_figure(tmp_path / "x.png", hu, {"a": hu}, {})
    with pytest.raises(ValueError, match=r"a has shape \(16, 12, 2\), fixed"):
        save_comparison_figure(tmp_path / "x.png", hu, {"a": hu[:, :, :2]}, {"a": {1: [0.5]}})
