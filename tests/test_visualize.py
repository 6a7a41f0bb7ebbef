"""Tests of voxelopt.visualize: the registration figure (orientation, slices, sizes, Dice) and
the comparison figure; valid PNGs written atomically."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from scipy import ndimage

import voxelopt._figure as figure
from voxelopt._label_stats import mean_dice
from voxelopt.metrics import BTCV13_LABELS, dice, mean_over_labels
from voxelopt.phantom import make_phantom
from voxelopt.visualize import (
    _LETTERS,
    FigurePlane,
    _display,
    choose_slices,
    save_comparison_figure,
    save_registration_figure,
    save_registration_planes,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AIR, TISSUE = -1000.0, 40.0  # black and mid-grey in the default window (-160, 240)


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
    packed = np.rint(rgb * 255).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    assert len(np.unique(packed)) > 50  # images, not just text
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")] == []
    return img


def _panels(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(row0, row1, col0, col1)`` of the image panels of a figure of volumes
    that are mostly air (black): the large dark connected regions, by row then column."""
    dark = img[..., :3].max(-1) < 0.1
    regions, _ = ndimage.label(dark)
    boxes = [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in ndimage.find_objects(regions)]
    boxes = [b for b in boxes if (b[1] - b[0]) * (b[3] - b[2]) > 20000]
    return sorted(boxes, key=lambda b: (b[0] // 50, b[2]))


def _grey_centre(img: np.ndarray, box) -> tuple[float, float]:
    """Centre of the mid-grey (tissue) pixels in ``box`` as fractions (across, down)."""
    r0, r1, c0, c1 = box
    grey = np.abs(img[r0:r1, c0:c1, :3] - 0.5).max(-1) < 0.1
    rows, cols = np.nonzero(grey)
    assert rows.size > 50, "no tissue visible in the panel"
    return cols.mean() / (c1 - c0), rows.mean() / (r1 - r0)


def _blob_volume(shape, right: bool) -> np.ndarray:
    """RAS+ air volume with a tissue cube towards the patient's right (or left), anterior
    and superior."""
    vol = np.full(shape, AIR, np.float32)
    d, h, w = shape
    xs = slice(d - 10, d - 4) if right else slice(4, 10)
    vol[xs, h - 10 : h - 4, w - 12 : w - 6] = TISSUE
    return vol


def test_orientation_radiological(tmp_path):
    """Patient's right on the image's left; anterior up (axial), superior up (coronal)."""
    shape = (40, 32, 48)
    right, left = _blob_volume(shape, True), _blob_volume(shape, False)
    path = save_registration_figure(tmp_path / "o.png", right, left, right, dpi=100)
    img = mpimg.imread(str(path))
    boxes = _panels(img)
    assert len(boxes) == 6  # (axial, coronal) x (fixed, moving, moved)
    axial_fixed, axial_moving, coronal_fixed = boxes[0], boxes[1], boxes[3]
    across, down = _grey_centre(img, axial_fixed)
    assert across < 0.5 and down < 0.5  # patient's right on the left, anterior up
    across, _ = _grey_centre(img, axial_moving)
    assert across > 0.5  # the moving blob is on the patient's left: image right
    across, down = _grey_centre(img, coronal_fixed)
    assert across < 0.5 and down < 0.5  # patient's right on the left, superior up


def test_letters_match_display():
    """Each panel's letters name where the display puts each end of the array's axes."""
    positive, negative = "RAS", "LPI"
    for axis, (left, right, bottom, top) in _LETTERS.items():
        across, up = [i for i in range(3) if i != axis]
        plane = np.zeros((5, 7))
        plane[-1, :] = 1  # far end of the axis shown across
        plane[:, -1] += 2  # far end of the axis shown upwards
        shown = _display(plane)  # rows upwards (origin "lower"), columns left to right
        assert (shown[:, 0] % 2 == 1).all() and (shown[:, -1] % 2 == 0).all()
        assert (shown[-1] >= 2).all() and (shown[0] < 2).all()
        assert (left, right) == (positive[across], negative[across])
        assert (top, bottom) == (positive[up], negative[up])


def test_pixel_size_and_anisotropic_panels(tmp_path):
    """Panels keep physical proportions, the smaller side 300 px at 100 dpi."""
    shape, spacing = (32, 24, 40), (2.0, 3.0, 1.5)  # axial 64 x 72 mm, coronal 64 x 60 mm
    vol = np.full(shape, AIR, np.float32)
    vol[10:20, 8:16, 15:25] = TISSUE
    entropy = np.random.default_rng(0).random(shape).astype(np.float32)
    kwargs = dict(entropy=entropy, spacing=spacing, title="t")
    img = _check_png(save_registration_figure(tmp_path / "a.png", vol, vol, vol, **kwargs))
    # 5 px per mm; width: margin 34 + 4 panels of 320 + 3 gaps of 10 + colour bar 96;
    # height: title and headings 62 + 360 + gap 10 + 300 + bottom 8
    assert img.shape[:2] == (740, 1440)
    boxes = _panels(img)
    sizes = [(b[1] - b[0], b[3] - b[2]) for b in boxes]
    assert sizes[:3] == [(360, 320)] * 3 and sizes[3:6] == [(300, 320)] * 3
    big = mpimg.imread(str(save_registration_figure(tmp_path / "b.png", vol, vol, vol, dpi=200)))
    small = mpimg.imread(str(save_registration_figure(tmp_path / "c.png", vol, vol, vol)))
    assert big.shape[:2] == (2 * small.shape[0], 2 * small.shape[1])


def test_choose_slices_through_labels():
    shape = (20, 16, 30)
    labels = np.zeros(shape, np.int64)
    labels[2:6, 2:6, 3:9] = 1  # large, alone at z 3..5
    labels[10:12, 10:12, 6:12] = 2  # small; both organs at z 6..8
    labels[14:16, 3:5, 7] = 3  # three organs at z = 7 ...
    labels[14:16, 4, 8] = 3  # ... and at z = 8, with less area
    # coronal: labels 1 and 3 at y = 3 and y = 4, more area at y = 4
    assert choose_slices(shape, labels) == {2: 7, 1: 4}
    # sagittal: one organ per slice; the first of the largest cross-sections (label 1)
    assert choose_slices(shape, labels, axes=(0,)) == {0: 2}
    body = np.full(shape, AIR, np.float32)
    body[:, 4:10, 20:26] = TISSUE  # without labels: through the body's centre
    assert choose_slices(shape, None, body) == {2: 22, 1: 6}  # centres 22.5 and 6.5 (even)
    assert choose_slices(shape) == {2: 15, 1: 8}


def test_slice_through_labels_in_figure(tmp_path):
    """An organ present in one axial slice only, far from the middle, is outlined."""
    shape = (32, 28, 40)
    vol = np.full(shape, TISSUE, np.float32)
    labels = np.zeros(shape, np.int64)
    labels[8:20, 6:18, 5] = 1
    colour = figure._rgb(figure._LABEL_COLOURS)[0] / 255.0
    path = save_registration_figure(tmp_path / "l.png", vol, vol, vol, fixed_labels=labels)
    img = mpimg.imread(str(path))[..., :3]
    hits = np.abs(img - colour).max(-1) < 0.02
    assert hits.sum() > 200
    no_labels = mpimg.imread(str(save_registration_figure(tmp_path / "n.png", vol, vol, vol)))
    assert (np.abs(no_labels[..., :3] - colour).max(-1) < 0.02).sum() == 0


def test_real_ct_liver_on_image_left(tmp_path, ct_dir):
    """The liver (patient's right) appears on the image's left of the axial panel."""
    from voxelopt.io import load_labels, load_volume

    ct = load_volume(ct_dir / "ct.nii.gz")
    labels = load_labels(ct_dir / "labels_btcv13.nii.gz").data
    path = save_registration_figure(
        tmp_path / "ct.png", ct.data, ct.data, ct.data, fixed_labels=labels, spacing=ct.spacing
    )
    img = mpimg.imread(str(path))
    liver, spleen = (figure._rgb(figure._LABEL_COLOURS)[k - 1] / 255.0 for k in (6, 1))
    # the axial fixed panel, top left: 122 x 101 voxels of 3 mm, its height 300 px
    row0, col0 = 8 + figure._ROW_TITLE, figure._LEFT
    axial = img[row0 : row0 + 300, col0 : col0 + round(122 * 300 / 101), :3]
    x_liver = np.nonzero(np.abs(axial - liver).max(-1) < 0.02)[1]
    x_spleen = np.nonzero(np.abs(axial - spleen).max(-1) < 0.02)[1]
    assert x_liver.size > 100 and x_spleen.size > 50
    assert x_liver.mean() < axial.shape[1] / 2 < x_spleen.mean()


def test_dice_in_title(monkeypatch, tmp_path, phantom):
    hu, labels = phantom
    titles = []
    draw = figure.draw_registration

    def spy(planes, spacing, window, title, names, dpi=100, moving_heading="moving"):
        titles.append(title)
        return draw(planes, spacing, window, title, names, dpi, moving_heading)

    monkeypatch.setattr(figure, "draw_registration", spy)
    other = np.where(labels == 6, 0, labels)  # the liver missing: Dice 0 for it
    path = tmp_path / "d.png"
    save_registration_figure(path, hu, hu, hu, None, labels, other, labels, title="P")
    expected = 100 * mean_over_labels(dice(other, labels))
    assert titles[-1] == f"P: mean Dice {expected:.1f} % before, 100.0 % after"
    save_registration_figure(path, hu, hu, hu, dice_before=0.25, dice_after=None)
    assert titles[-1] == "mean Dice 25.0 % before, n/a after"
    save_registration_figure(path, hu, hu, hu)
    assert titles[-1] == ""
    slab = labels[:, 3:4]  # a one-voxel slab shows its plane and computes no Dice
    save_registration_figure(path, hu[:, 3:4], hu[:, 3:4], hu[:, 3:4], None, slab, slab, slab)
    assert titles[-1] == ""


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.float32])
def test_mean_dice_matches_metrics(dtype):
    rng = np.random.default_rng(1)
    values = np.array([0, 2, 3, 7, 9, 12])  # gaps: labels absent from both maps
    a = values[rng.integers(0, 6, (12, 10, 8))]
    b = np.where(rng.random(a.shape) < 0.7, a, values[rng.integers(0, 6, a.shape)])
    b[b == 12] = 0  # label 12 only in a
    reference = mean_over_labels(dice(a, b))
    assert mean_dice(a.astype(dtype), b.astype(dtype)) == pytest.approx(reference, abs=1e-12)
    big = np.where(a > 0, a + 1000, 0)  # large label values take the np.unique path
    assert mean_dice(big, np.where(b > 0, b + 1000, 0)) == pytest.approx(reference, abs=1e-12)
    assert np.isnan(mean_dice(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int)))


def test_png_writer_round_trip(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "r.png"
    path.write_bytes(figure.png_bytes(image, 100))
    back = mpimg.imread(str(path))
    assert back.shape == (37, 53, 3)
    np.testing.assert_array_equal(np.rint(back * 255).astype(np.uint8), image)


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
        label_names=BTCV13_LABELS,
    )
    with_entropy = _check_png(path)
    plain = _check_png(save_registration_figure(tmp_path / "plain.png", hu, hu, moved))
    assert with_entropy.shape[1] > plain.shape[1]  # the entropy panel and its colour bar


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_registration_figure_axes(tmp_path, phantom, axis):
    hu, _ = phantom
    _check_png(save_registration_figure(tmp_path / f"a{axis}.png", hu, hu, hu, axis=axis, index=3))


def test_registration_planes(tmp_path, phantom):
    """The entry point for planes resampled one by one (e.g. from slabs of a large CT)."""
    hu, labels = phantom
    planes = [
        FigurePlane.cut(a, i, fixed=hu, moving=hu, moved=hu, fixed_labels=labels)
        for a, i in ((2, 10), (1, 6))
    ]
    _check_png(save_registration_planes(tmp_path / "p.png", planes, (18.0, 18.0, 18.0)))
    with pytest.raises(ValueError, match="planes is empty"):
        save_registration_planes(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="spacing"):
        save_registration_planes(tmp_path / "x.png", planes, (1.0, 0.0, 1.0))
    mixed = [planes[0], FigurePlane.cut(1, 6, fixed=hu, moving=hu, moved=hu, entropy=hu)]
    with pytest.raises(ValueError, match="entropy for every plane"):
        save_registration_planes(tmp_path / "x.png", mixed)
    bad = FigurePlane(2, 0, hu[:, :, 0], hu[:, :, 0], hu[:-1, :, 0])
    with pytest.raises(ValueError, match="moved has shape"):
        save_registration_planes(tmp_path / "x.png", [bad])


def test_registration_figure_errors(tmp_path, phantom):
    hu, labels = phantom
    with pytest.raises(ValueError, match="moved has shape"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu[:-1])
    with pytest.raises(ValueError, match="fixed_labels has shape"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, fixed_labels=labels[:, 1:])
    with pytest.raises(ValueError, match="D, H, W"):
        save_registration_figure(tmp_path / "x.png", hu[0], hu, hu)
    with pytest.raises(ValueError, match="D, H, W"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, entropy=np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="index"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, axis=2, index=99)
    with pytest.raises(ValueError, match="index"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, index={1: -1})
    with pytest.raises(ValueError, match="mapping"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, index=3)  # two planes
    with pytest.raises(ValueError, match="axis"):
        save_registration_figure(tmp_path / "x.png", hu, hu, hu, axis=3)
    with pytest.raises(FileNotFoundError, match="folder"):
        save_registration_figure(tmp_path / "no" / "x.png", hu, hu, hu)
    assert not (tmp_path / "x.png").exists()


def test_comparison_figure(tmp_path, phantom):
    hu, _ = phantom
    dice_values = {
        "initial": {1: [0.3, 0.4, 0.5], 6: [0.6, 0.7], 2: [float("nan")]},
        "voxelopt": {1: [0.8, 0.85], 6: [0.9, 0.92, 0.95], 2: [0.7]},
    }
    path = save_comparison_figure(
        tmp_path / "cmp.png",
        hu,
        {"initial": hu, "voxelopt": np.roll(hu, 1, 0)},
        dice_values,
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


def test_moving_heading(monkeypatch, tmp_path, phantom):
    """The moving column's heading is passed through (e.g. "moving (affine)" after a
    pre-alignment) and the default stays "moving"."""
    hu, labels = phantom
    seen = []
    draw = figure.draw_registration

    def spy(planes, spacing, window, title, names, dpi=100, moving_heading="moving"):
        seen.append(moving_heading)
        return draw(planes, spacing, window, title, names, dpi, moving_heading)

    monkeypatch.setattr(figure, "draw_registration", spy)
    path = tmp_path / "h.png"
    save_registration_figure(path, hu, hu, hu)
    assert seen[-1] == "moving"
    planes = _planes_for_heading(hu)
    a = draw(planes, (1.0, 1.0, 1.0), (-160.0, 240.0), "", None, 100, "moving")
    b = draw(planes, (1.0, 1.0, 1.0), (-160.0, 240.0), "", None, 100, "moving (affine)")
    assert a.shape == b.shape and not np.array_equal(a, b)  # the heading is drawn


def _planes_for_heading(hu):
    from voxelopt.visualize import FigurePlane

    cut = np.asarray(hu)[:, :, hu.shape[2] // 2]
    return [FigurePlane(2, hu.shape[2] // 2, fixed=cut, moving=cut, moved=cut)]
