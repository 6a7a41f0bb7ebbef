"""LightningDataModules over the library's data layer (:mod:`voxelopt.data`).

* :class:`AbdomenCTDataModule`: the paper's 30-scan dataset (paper or Learn2Reg layout); every
  ordered pair of distinct subjects within a split is one sample (7 test subjects: 42 pairs);
* :class:`SyntheticPairDataModule`: known smooth deformations of one or more real CTs, with
  disjoint seeds for train, validation and test.

Samples and batches are described in :mod:`voxelopt.data.datasets`.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from voxelopt.checks import check_positive_int
from voxelopt.data import (
    DEFAULT_SPLITS,
    Layout,
    PairDataset,
    Subject,
    SyntheticPairDataset,
    find_subjects,
    prepare_volume,
    validate_subjects,
)
from voxelopt.io import load_labels, load_volume
from voxelopt.paths import abdomen_ct_dir

__all__ = ["AbdomenCTDataModule", "PairDataModule", "SyntheticPairDataModule"]


class PairDataModule(pl.LightningDataModule):
    """Loaders shared by the real and synthetic pair DataModules.

    Subclasses fill ``self.datasets`` (``"train"``, ``"val"``, ``"test"``) in ``setup``.

    Args:
        batch_size: pairs per training batch (evaluation always uses 1: grids may differ).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"the {split} split is not set up; call setup() first")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, 1)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False, 1)


class AbdomenCTDataModule(PairDataModule):
    """The paper's 30-scan abdominal CT dataset, pairs within subject splits.

    Args:
        data_dir: dataset folder (either layout).
        layout: ``"auto"``, ``"paper"`` or ``"learn2reg"``.
        dataset_json: Learn2Reg dataset JSON (default: found in ``data_dir``).
        train_subjects: subject numbers of the training split (default 1-20).
        val_subjects: validation split (default 21-23).
        test_subjects: test split (default 24-30; 42 ordered pairs).
        downsample: grid reduction factor (the reference registers at 2).
        clip_hu: optional ``(low, high)`` HU window; images otherwise stay in HU.
        full_check: decode every file in ``setup`` (slower) instead of reading headers only.
        cache: keep loaded subjects in memory.
        batch_size: pairs per training batch.
        num_workers: DataLoader workers.
        spacing_mm: working grid in mm or ``"auto"``, as ``voxelopt register --spacing``
            (applied after ``downsample``; ``None`` keeps the grid).
    """

    def __init__(
        self,
        data_dir: str | Path,
        layout: Layout = "auto",
        dataset_json: str | Path | None = None,
        train_subjects: list[int] | None = None,
        val_subjects: list[int] | None = None,
        test_subjects: list[int] | None = None,
        downsample: int = 1,
        clip_hu: tuple[float, float] | None = None,
        full_check: bool = False,
        cache: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
        spacing_mm: float | str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_positive_int(downsample, "downsample")
        if clip_hu is not None and not clip_hu[0] < clip_hu[1]:
            raise ValueError(f"clip_hu must be (low, high) with low < high, got {clip_hu!r}")
        if layout not in ("auto", "paper", "learn2reg"):
            raise ValueError(f"layout must be 'auto', 'paper' or 'learn2reg', got {layout!r}")
        self.data_dir = Path(data_dir)
        self.layout = layout
        self.dataset_json = dataset_json
        given = {"train": train_subjects, "val": val_subjects, "test": test_subjects}
        self.splits = {
            split: list(ids) if ids is not None else list(DEFAULT_SPLITS[split])
            for split, ids in given.items()
        }
        seen: dict[int, str] = {}
        for split, ids in self.splits.items():
            for i in ids:
                if i in seen and seen[i] != split:
                    raise ValueError(
                        f"subject {i} is in both {seen[i]}_subjects and {split}_subjects"
                    )
                seen[i] = split
        self.downsample = downsample
        self.clip_hu = None if clip_hu is None else (float(clip_hu[0]), float(clip_hu[1]))
        self.full_check = full_check
        self.cache = cache
        self.spacing_mm = spacing_mm

    def split_subjects(self) -> dict[str, list[Subject]]:
        """Resolve each split's subject numbers to files (checks that every number exists)."""
        found = find_subjects(self.data_dir, self.layout, self.dataset_json)
        out = {}
        for split, ids in self.splits.items():
            missing = [i for i in ids if i not in found]
            if missing:
                raise FileNotFoundError(
                    f"{split}_subjects {missing} have no image in {self.data_dir} "
                    f"(found subjects {sorted(found)})"
                )
            out[split] = [found[i] for i in ids]
        return out

    def setup(self, stage: str | None = None) -> None:
        """Check every file of every split, then build the pair datasets."""
        if self.datasets:
            return
        subjects = self.split_subjects()
        validate_subjects([s for split in subjects.values() for s in split], full=self.full_check)
        for split, subs in subjects.items():
            self.datasets[split] = PairDataset(
                subs, self.downsample, self.clip_hu, self.cache, self.spacing_mm
            )


class SyntheticPairDataModule(PairDataModule):
    """Synthetic registration pairs of one or more real CTs (default: the shared CT).

    Train, validation and test pairs use disjoint seeds (``seed``, ``seed + 100000``,
    ``seed + 200000`` onwards), so validation and test deformations are held out.

    Args:
        images: CT files (HU); default the shared ``ct.nii.gz`` (``voxelopt.paths``).
        labels: their label files, one per image; default the shared 13-organ labels.
        downsample: integer grid reduction of the base volumes (2: the 3 mm CT at ~6 mm).
        size: exact ``(D, H, W)`` to resample the base volumes to (after ``downsample``),
            e.g. ``[32, 32, 32]`` for tests.
        clip_hu: optional ``(low, high)`` HU window applied to the base volumes.
        num_train: training pairs.
        num_val: validation pairs.
        num_test: test pairs.
        seed: base seed.
        max_displacement_mm: largest displacement of each true field.
        control_spacing_mm: control-point distance of the random fields.
        moving_displacement_mm: pre-deformation of each moving image (0: none).
        intensity_change: smooth bias and noise on the moving images.
        batch_size: pairs per training batch.
        num_workers: DataLoader workers.
        spacing_mm: working grid of the base volumes in mm or ``"auto"`` (after
            ``downsample``, before ``size``).
    """

    _SEED_STRIDE = 100_000

    def __init__(
        self,
        images: list[str] | None = None,
        labels: list[str] | None = None,
        downsample: int = 2,
        size: list[int] | None = None,
        clip_hu: tuple[float, float] | None = None,
        num_train: int = 16,
        num_val: int = 4,
        num_test: int = 4,
        seed: int = 0,
        max_displacement_mm: float = 15.0,
        control_spacing_mm: float = 40.0,
        moving_displacement_mm: float = 0.0,
        intensity_change: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
        spacing_mm: float | str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if (images is None) != (labels is None):
            raise ValueError("give both images and labels, or neither (the shared CT)")
        if images is None:
            folder = abdomen_ct_dir()
            images, labels = [str(folder / "ct.nii.gz")], [str(folder / "labels_btcv13.nii.gz")]
        if len(images) != len(labels) or not images:
            raise ValueError(
                f"images and labels must be non-empty and of equal length, got "
                f"{len(images)} and {len(labels)}"
            )
        check_positive_int(downsample, "downsample")
        counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
        for name, value in counts.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.images = [Path(p) for p in images]
        self.labels = [Path(p) for p in labels]
        self.downsample = downsample
        self.size = size
        self.clip_hu = clip_hu
        self.spacing_mm = spacing_mm
        self.counts = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.pair_kwargs = {
            "max_displacement_mm": max_displacement_mm,
            "control_spacing_mm": control_spacing_mm,
            "moving_displacement_mm": moving_displacement_mm,
            "intensity_change": intensity_change,
        }

    def setup(self, stage: str | None = None) -> None:
        """Check and load the base volumes, then build the three pair datasets."""
        if self.datasets:
            return
        subjects = [
            Subject(i, image, label)
            for i, (image, label) in enumerate(zip(self.images, self.labels, strict=True))
        ]
        validate_subjects(subjects)
        volumes = [
            prepare_volume(
                load_volume(s.image),
                load_labels(s.label),
                self.downsample,
                self.clip_hu,
                self.size,
                spacing_mm=self.spacing_mm,
            )
            for s in subjects
        ]
        for k, split in enumerate(("train", "val", "test")):
            self.datasets[split] = SyntheticPairDataset(
                volumes,
                self.counts[split],
                seed=self.seed + k * self._SEED_STRIDE,
                **self.pair_kwargs,
            )
