"""The pair DataModule: both layouts, subject splits, ordered pairs, up-front file checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.data import AbdomenCTDataModule, SyntheticPairDataModule
from voxelopt.data import PairDataset, find_subjects, load_subject
from voxelopt.transform import warp


@pytest.mark.parametrize("layout", ["paper", "l2r"])
def test_default_splits_and_pairs(layout, paper_dir, l2r_dir, fake_data):
    root = paper_dir if layout == "paper" else l2r_dir
    dm = AbdomenCTDataModule(root)
    dm.setup("fit")
    sizes = {split: len(ds) for split, ds in dm.datasets.items()}
    assert sizes == {"train": 20 * 19, "val": 3 * 2, "test": 7 * 6}
    test = dm.datasets["test"]
    names = [test[i]["pair"] for i in range(len(test))]
    assert len(set(names)) == 42 and names[0] == "0024_0025" and "0025_0024" in names
    assert all(f != m for f, m in (n.split("_") for n in names))
    sample = test[0]
    assert sample["fixed"].shape == (1, *fake_data.shape) and sample["fixed"].dtype == torch.float32
    assert sample["fixed_label"].dtype == torch.int64
    assert set(sample["fixed_label"].unique().tolist()) == {0, 1, 2}
    assert sample["pair_id"] == 0
    # intensities stay in HU and encode the subject: 10 * id - 500
    assert sample["fixed"].mean().item() == pytest.approx(10 * 24 - 500, abs=3)
    assert sample["moving"].mean().item() == pytest.approx(10 * 25 - 500, abs=3)
    torch.testing.assert_close(sample["spacing"], torch.tensor([2.0, 2.0, 2.0]))


def test_learn2reg_without_json(tmp_path, fake_data):
    root = fake_data.learn2reg(tmp_path, ids=range(1, 5), with_json=False)
    subjects = find_subjects(root)
    assert sorted(subjects) == [1, 2, 3, 4]
    assert subjects[3].label == root / "labelsTr" / "AbdomenCTCT_0003_0000.nii.gz"


def test_json_lists_only_its_entries(tmp_path, fake_data):
    root = fake_data.learn2reg(tmp_path, ids=range(1, 6), with_json=False)
    entries = [
        {
            "image": f"./imagesTr/AbdomenCTCT_{i:04d}_0000.nii.gz",
            "label": f"./labelsTr/AbdomenCTCT_{i:04d}_0000.nii.gz",
        }
        for i in (1, 2, 4)
    ]
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps({"training": entries}))
    assert sorted(find_subjects(root)) == [1, 2, 4]


def test_custom_splits_dataloader(paper_dir, fake_data):
    dm = AbdomenCTDataModule(
        paper_dir,
        train_subjects=[1, 2, 3],
        val_subjects=[4, 5],
        test_subjects=[6, 7, 8],
        batch_size=2,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == (2, 1, *fake_data.shape)
    assert batch["pair_id"].shape == (2,) and len(batch["pair"]) == 2
    assert len(dm.datasets["val"]) == 2 and len(dm.datasets["test"]) == 6


def test_downsample_and_clip(paper_dir):
    subject = find_subjects(paper_dir)[3]
    full_image, full_label, spacing = load_subject(subject)
    image, label, half_spacing = load_subject(subject, downsample=2, clip_hu=(-480.0, -460.0))
    # every second voxel (voxelopt.data.volumes): ceil(n / 2) voxels, spacing exactly doubled
    assert image.shape == (1, 6, 5, 4) and label.shape == (1, 6, 5, 4)
    assert image.min() >= -480 and image.max() <= -460
    torch.testing.assert_close(label, full_label[:, ::2, ::2, ::2])
    torch.testing.assert_close(half_spacing, spacing * 2)


def test_canonical_orientation(tmp_path):
    """A file stored in LPS order is read back in RAS+ array order."""
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    import nibabel as nib

    (tmp_path / "img").mkdir()
    (tmp_path / "label").mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "img" / "img0001.nii.gz"))
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "label" / "label0001.nii.gz"))
    image, _, _ = load_subject(find_subjects(tmp_path)[1])
    np.testing.assert_array_equal(image[0].numpy(), data[::-1, ::-1, :].astype(np.float32))


# ------------------------------------------------------------------ errors, named up front
def test_missing_label_named(paper_dir):
    (paper_dir / "label" / "label0027.nii.gz").unlink()
    dm = AbdomenCTDataModule(paper_dir)
    with pytest.raises(FileNotFoundError, match="label0027.nii.gz"):
        dm.setup("test")


def test_malformed_image_named(l2r_dir):
    (l2r_dir / "imagesTr" / "AbdomenCTCT_0005_0000.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(ValueError, match="AbdomenCTCT_0005_0000.nii.gz"):
        AbdomenCTDataModule(l2r_dir).setup("test")  # a training file, checked before testing


def test_truncated_file_found_by_full_check(paper_dir):
    path = paper_dir / "img" / "img0030.nii.gz"
    path.write_bytes(path.read_bytes()[:-60])
    AbdomenCTDataModule(paper_dir).setup()  # headers only: still readable
    with pytest.raises(ValueError, match="img0030.nii.gz"):
        AbdomenCTDataModule(paper_dir, full_check=True).setup()


def test_label_grid_mismatch_named(paper_dir, fake_data):
    fake_data.write_volume(paper_dir / "label" / "label0002.nii.gz", np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="label0002.nii.gz"):
        AbdomenCTDataModule(paper_dir).setup()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_subjects": [24, 31]}, FileNotFoundError, r"test_subjects \[31\]"),
        ({"val_subjects": [20, 21]}, ValueError, "subject 20 is in both"),
        ({"test_subjects": [24]}, ValueError, "at least 2 subjects"),
        ({"downsample": 0}, ValueError, "downsample"),
        ({"clip_hu": (100.0, -100.0)}, ValueError, "clip_hu"),
        ({"layout": "nifti"}, ValueError, "layout"),
    ],
)
def test_bad_arguments(paper_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        AbdomenCTDataModule(paper_dir, **kwargs).setup()


def test_bad_folders_and_json(tmp_path, l2r_dir):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        AbdomenCTDataModule(tmp_path / "nowhere").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither img/"):
        AbdomenCTDataModule(tmp_path / "empty").setup()
    (l2r_dir / "AbdomenCTCT_dataset.json").write_text("{broken")
    with pytest.raises(ValueError, match="AbdomenCTCT_dataset.json is not valid JSON"):
        AbdomenCTDataModule(l2r_dir).setup()


def test_pair_dataset_index_error(paper_dir):
    subjects = find_subjects(paper_dir)
    ds = PairDataset([subjects[1], subjects[2]])
    assert len(ds) == 2
    with pytest.raises(IndexError):
        ds[2]


# ------------------------------------------------------------------ synthetic pairs
@pytest.fixture
def base_volume(tmp_path, fake_data):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 200, (14, 12, 10)).astype(np.float32)
    label = np.zeros((14, 12, 10), np.uint8)
    label[3:10, 3:9, 2:8] = 6
    image_path = fake_data.write_volume(tmp_path / "ct.nii.gz", image, spacing=(3.0, 3.0, 3.0))
    label_path = fake_data.write_volume(tmp_path / "lab.nii.gz", label, spacing=(3.0, 3.0, 3.0))
    return [str(image_path)], [str(label_path)]


def synthetic(base_volume, **kwargs):
    images, labels = base_volume
    kwargs = {"downsample": 1, "num_train": 3, "num_val": 2, "num_test": 2, **kwargs}
    dm = SyntheticPairDataModule(images, labels, **kwargs)
    dm.setup()
    return dm


def test_synthetic_deterministic_and_held_out(base_volume):
    a, b = synthetic(base_volume), synthetic(base_volume)
    first = a.datasets["val"][1]
    for key in ("fixed", "moving", "true_disp", "fixed_label"):
        torch.testing.assert_close(first[key], b.datasets["val"][1][key], rtol=0, atol=0)
    names = {s: [a.datasets[s][i]["pair"] for i in range(len(a.datasets[s]))] for s in a.datasets}
    assert not set(names["train"]) & set(names["val"]) and not set(names["val"]) & set(
        names["test"]
    )
    assert not torch.equal(a.datasets["train"][0]["true_disp"], first["true_disp"])
    assert first["true_disp"].abs().max() > 0.5  # 15 mm at 3 mm voxels


@pytest.mark.parametrize("moving_mm", [0.0, 6.0])
def test_synthetic_true_field_maps_moving_onto_fixed(base_volume, moving_mm):
    dm = synthetic(base_volume, intensity_change=False, moving_displacement_mm=moving_mm)
    sample = dm.datasets["train"][2]
    moved = warp(sample["moving"][None], sample["true_disp"][None], padding_mode="border")[0]
    torch.testing.assert_close(moved, sample["fixed"], rtol=0, atol=1e-3)
    assert sample["fixed"].shape == (1, 14, 12, 10) and sample["true_disp"].shape == (3, 14, 12, 10)


def test_synthetic_size_intensity_and_batches(base_volume):
    dm = synthetic(base_volume, size=[8, 8, 8], batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["fixed"].shape == (2, 1, 8, 8, 8) and batch["true_disp"].shape == (2, 3, 8, 8, 8)
    torch.testing.assert_close(batch["spacing"][0], torch.tensor([39 / 7, 33 / 7, 27 / 7]))
    clean = synthetic(base_volume, size=[8, 8, 8], intensity_change=False).datasets["train"][0]
    noisy = dm.datasets["train"][0]
    torch.testing.assert_close(noisy["fixed"], clean["fixed"])  # the fixed image is untouched
    assert (noisy["moving"] - clean["moving"]).abs().mean() > 1.0


def test_synthetic_shared_ct_default(ct_dir):
    dm = SyntheticPairDataModule(num_train=1, num_val=1, num_test=1, size=[16, 16, 16])
    dm.setup()
    sample = dm.datasets["test"][0]
    assert sample["fixed"].shape == (1, 16, 16, 16)
    assert set(sample["moving_label"].unique().tolist()) > {0, 1, 6}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_val": 0}, "num_val"),
        ({"downsample": 1.5}, "downsample"),
        ({"size": [8, 8]}, "size"),
        ({"max_displacement_mm": -1.0}, "max_displacement_mm"),
    ],
)
def test_synthetic_bad_arguments(base_volume, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic(base_volume, **kwargs)


def test_synthetic_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        SyntheticPairDataModule(
            [str(tmp_path / "nope.nii.gz")], [str(tmp_path / "l.nii.gz")]
        ).setup()
    with pytest.raises(ValueError, match="both images and labels"):
        SyntheticPairDataModule(images=["a.nii.gz"])


def test_working_spacing_in_mm(paper_dir):
    """``spacing_mm`` gives the command line's working grid: same box of voxel centres."""
    subject = find_subjects(paper_dir)[3]
    full, _, full_spacing = load_subject(subject)
    image, label, spacing = load_subject(subject, spacing_mm=4.0)
    n, s = torch.tensor(full.shape[1:]), full_spacing.double()
    expected = torch.round((n - 1) * s / 4.0).long() + 1  # first and last centres kept
    assert image.shape[1:] == label.shape[1:] == tuple(expected.tolist())
    torch.testing.assert_close(spacing.double(), (n - 1) * s / (expected - 1))
    assert set(label.unique().tolist()) <= {0, 1, 2}
    same, _, same_spacing = load_subject(subject, spacing_mm="auto")  # small: its own grid
    assert same.shape == full.shape and torch.equal(same_spacing, full_spacing)
    dm = AbdomenCTDataModule(paper_dir, spacing_mm=4.0)
    dm.setup("test")
    assert dm.datasets["test"][0]["fixed"].shape == image.shape
