"""Pairwise abdominal CT registration data: the 30-scan dataset and synthetic pairs.

Two on-disk layouts of the paper's 30 abdominal CT scans are read:

* ``paper``: ``img/imgNNNN.nii.gz`` and ``label/labelNNNN.nii.gz``;
* ``learn2reg`` (AbdomenCTCT): ``imagesTr/AbdomenCTCT_NNNN_0000.nii.gz`` and
  ``labelsTr/AbdomenCTCT_NNNN_0000.nii.gz``, listed in a dataset JSON
  (``*_dataset.json``, entries under ``training`` and ``validation``) when there is one.

Subjects are split by number (default 1-20 train, 21-23 val, 24-30 test) and every ordered
pair of distinct subjects within a split is one sample (fixed first): 7 test subjects give
42 pairs. Every file of every split is checked before any work starts, and a missing or
malformed file is reported by name.

A sample is a dict::

    fixed, moving:             (1, D, H, W) float32, Hounsfield units (optionally clipped)
    fixed_label, moving_label: (1, D, H, W) int64 organ labels (0 = background)
    spacing:                   (3,) float32 voxel size in mm along (D, H, W)
    pair_id:                   int, unique within the split (keys the metric state under DDP)
    pair:                      str, "<fixed>_<moving>" subject numbers, e.g. "0024_0025"
    true_disp:                 (3, D, H, W) float32, synthetic pairs only: the known field in
                               voxels with ``fixed(x) = moving(x + true_disp(x))``

A batch is the default collation of samples (tensors stacked, ``pair`` a list of str).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from voxelopt.io import Volume, load_labels, load_volume
from voxelopt.paths import abdomen_ct_dir
from voxelopt.phantom import make_pair, random_smooth_displacement
from voxelopt.transform import resize_volume, warp

__all__ = [
    "AbdomenCTDataModule",
    "PairDataModule",
    "PairDataset",
    "Subject",
    "SyntheticPairDataModule",
    "SyntheticPairDataset",
    "find_subjects",
    "load_subject",
    "prepare_volume",
    "validate_subjects",
]

Layout = Literal["auto", "paper", "learn2reg"]
DEFAULT_SPLITS = {
    "train": list(range(1, 21)),
    "val": list(range(21, 24)),
    "test": list(range(24, 31)),
}
_PAPER_IMAGE = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_L2R_IMAGE = re.compile(r"^(?:.*_)?(\d+)_0000\.nii(\.gz)?$")


@dataclass(frozen=True)
class Subject:
    """One scan of the dataset.

    Attributes:
        id: subject number (``1`` for ``img0001`` / ``AbdomenCTCT_0001_0000``).
        image: path of the CT (Hounsfield units).
        label: path of its organ label map.
    """

    id: int
    image: Path
    label: Path


# --------------------------------------------------------------------------- discovery
def _detect_layout(data_dir: Path) -> str:
    if (data_dir / "img").is_dir():
        return "paper"
    if (data_dir / "imagesTr").is_dir():
        return "learn2reg"
    raise FileNotFoundError(
        f"data_dir {data_dir} has neither img/ (paper layout) nor imagesTr/ (Learn2Reg layout)"
    )


def _paper_subjects(data_dir: Path) -> dict[int, Subject]:
    subjects = {}
    for image in sorted((data_dir / "img").iterdir()):
        match = _PAPER_IMAGE.match(image.name)
        if match is None:
            continue
        sid = int(match.group(1))
        label = data_dir / "label" / image.name.replace("img", "label", 1)
        subjects[sid] = Subject(sid, image, label)
    return subjects


def _find_dataset_json(data_dir: Path) -> Path | None:
    candidates = sorted(data_dir.glob("*_dataset.json")) + sorted(data_dir.glob("dataset.json"))
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ValueError(f"data_dir {data_dir} has several dataset JSONs ({names}); pass one")
    return candidates[0] if candidates else None


def _learn2reg_subjects(data_dir: Path, dataset_json: Path | None) -> dict[int, Subject]:
    json_path = dataset_json if dataset_json is not None else _find_dataset_json(data_dir)
    subjects = {}
    if json_path is None:  # no JSON: every image in imagesTr, its label of the same name
        for image in sorted((data_dir / "imagesTr").iterdir()):
            match = _L2R_IMAGE.match(image.name)
            if match is not None:
                sid = int(match.group(1))
                subjects[sid] = Subject(sid, image, data_dir / "labelsTr" / image.name)
        return subjects
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"dataset_json {json_path} does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"dataset JSON {json_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"dataset JSON {json_path} must hold an object, got {type(meta).__name__}")
    entries = [e for key in ("training", "validation") for e in meta.get(key, [])]
    if not entries:
        raise ValueError(f"dataset JSON {json_path} lists no 'training' or 'validation' entries")
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"dataset JSON {json_path}: entry {entry!r} has no 'image'")
        image = (json_path.parent / entry["image"]).resolve()
        match = _L2R_IMAGE.match(image.name)
        if match is None:
            raise ValueError(
                f"dataset JSON {json_path}: cannot read a subject number from {image.name} "
                "(expected NAME_NNNN_0000.nii.gz)"
            )
        label = entry.get("label")
        label = (
            (json_path.parent / label).resolve() if label else data_dir / "labelsTr" / image.name
        )
        sid = int(match.group(1))
        subjects[sid] = Subject(sid, image, label)
    return subjects


def find_subjects(
    data_dir: str | Path, layout: Layout = "auto", dataset_json: str | Path | None = None
) -> dict[int, Subject]:
    """List the subjects of a dataset folder (paths only; nothing is read).

    Args:
        data_dir: the dataset folder.
        layout: ``"paper"``, ``"learn2reg"`` or ``"auto"`` (``img/`` -> paper,
            ``imagesTr/`` -> learn2reg).
        dataset_json: Learn2Reg dataset JSON (default: the one ``*_dataset.json`` in
            ``data_dir``, else every image in ``imagesTr``).

    Returns:
        ``{subject number: Subject}``.

    Raises:
        FileNotFoundError: if the folder or the layout's image folder is missing.
        ValueError: for an unknown layout or a malformed dataset JSON.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} is not a directory")
    if layout == "auto":
        layout = _detect_layout(data_dir)
    if layout == "paper":
        if not (data_dir / "img").is_dir():
            raise FileNotFoundError(f"paper layout needs {data_dir / 'img'}")
        return _paper_subjects(data_dir)
    if layout == "learn2reg":
        if not (data_dir / "imagesTr").is_dir() and dataset_json is None:
            raise FileNotFoundError(f"learn2reg layout needs {data_dir / 'imagesTr'}")
        return _learn2reg_subjects(data_dir, None if dataset_json is None else Path(dataset_json))
    raise ValueError(f"layout must be 'auto', 'paper' or 'learn2reg', got {layout!r}")


# --------------------------------------------------------------------------- checking
def _check_nifti(path: Path, what: str, full: bool) -> tuple[int, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        if full:
            data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for broken files
        raise ValueError(f"{what} file {path} is not a readable NIfTI: {err}") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{what} file {path} must be a 3D volume, got shape {shape}")
    if full and not np.isfinite(data).all():
        raise ValueError(f"{what} file {path} contains NaN or infinite values")
    return shape


def validate_subjects(subjects: Sequence[Subject], full: bool = False) -> None:
    """Check that every image and label exists, is a 3D NIfTI, and that their grids agree.

    Args:
        subjects: the subjects to check.
        full: also decode every voxel (finds truncated files, NaNs) instead of only headers.

    Raises:
        FileNotFoundError: naming the first missing file.
        ValueError: naming the first unreadable file or mismatching pair.
    """
    for s in subjects:
        image_shape = _check_nifti(s.image, "image", full)
        label_shape = _check_nifti(s.label, "label", full)
        if image_shape != label_shape:
            raise ValueError(
                f"label {s.label} has shape {label_shape} but its image {s.image} has {image_shape}"
            )


# --------------------------------------------------------------------------- loading
def _resize_labels(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resampling of ``(..., D, H, W)`` at the corner-aligned coordinates
    ``i * (n - 1) / (m - 1)`` that :func:`voxelopt.transform.resize_volume` samples."""
    for axis, (n, m) in enumerate(zip(label.shape[-3:], size, strict=True)):
        scale = (n - 1) / (m - 1) if m > 1 else 0.0
        index = torch.round(torch.arange(m, dtype=torch.float64) * scale).long()
        label = label.index_select(label.dim() - 3 + axis, index)
    return label


def load_subject(
    subject: Subject, downsample: int = 1, clip_hu: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Read one subject's CT and labels onto the (optionally downsampled) working grid.

    Args:
        subject: the subject.
        downsample: integer factor; each size ``n`` becomes ``n // downsample`` (images
            trilinear, labels nearest, corners aligned).
        clip_hu: optional ``(low, high)`` window in HU applied to the image.

    Returns:
        ``image (1, D, H, W)`` float32 HU, ``label (1, D, H, W)`` int64 and ``spacing (3,)``
        float32 in mm of the returned grid.
    """
    image, label = load_volume(subject.image), load_labels(subject.label)
    return prepare_volume(image, label, downsample, clip_hu)


def prepare_volume(
    image: Volume,
    label: Volume,
    downsample: int = 1,
    clip_hu: tuple[float, float] | None = None,
    size: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bring a loaded CT and its labels onto the working grid as tensors.

    Args:
        image: CT volume (HU, RAS+).
        label: its label map on the same grid.
        downsample: integer factor; each size ``n`` becomes ``n // downsample``.
        clip_hu: optional ``(low, high)`` HU window.
        size: exact ``(D, H, W)`` to resample to instead (applied after ``downsample``).

    Returns:
        ``image (1, D, H, W)`` float32, ``label (1, D, H, W)`` int64, ``spacing (3,)`` mm.
    """
    if image.shape != label.shape:
        raise ValueError(
            f"label {label.path} has shape {label.shape} but its image {image.path} has "
            f"{image.shape}"
        )
    image_t = torch.from_numpy(np.ascontiguousarray(image.data, dtype=np.float32))[None]
    label_t = torch.from_numpy(np.ascontiguousarray(label.data, dtype=np.int64))[None]
    spacing_t = torch.tensor(image.spacing, dtype=torch.float64)
    if clip_hu is not None:
        image_t = image_t.clamp(float(clip_hu[0]), float(clip_hu[1]))
    targets = []
    if downsample != 1:
        targets.append([max(n // downsample, 1) for n in image_t.shape[1:]])
    if size is not None:
        if len(size) != 3 or any(int(n) < 2 for n in size):
            raise ValueError(f"size must be 3 integers >= 2, got {size!r}")
        targets.append([int(n) for n in size])
    for target in targets:
        old = image_t.shape[1:]
        image_t = resize_volume(image_t[None], target)[0]
        label_t = _resize_labels(label_t, target)
        spacing_t = spacing_t * torch.tensor(
            [(n - 1) / (m - 1) if m > 1 else float(n) for n, m in zip(old, target, strict=True)],
            dtype=torch.float64,
        )
    return image_t, label_t, spacing_t.float()


class PairDataset(Dataset):
    """Every ordered pair of distinct subjects (fixed, moving) of one split.

    Args:
        subjects: the split's subjects (at least two).
        downsample: grid reduction factor (see :func:`load_subject`).
        clip_hu: optional HU window applied to every image.
        cache: keep each loaded subject in memory (per process / worker).
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        downsample: int = 1,
        clip_hu: tuple[float, float] | None = None,
        cache: bool = True,
    ) -> None:
        if len(subjects) < 2:
            raise ValueError(
                f"a split needs at least 2 subjects to form pairs, got {len(subjects)}"
            )
        self.subjects = list(subjects)
        self.pairs = [(f, m) for f in self.subjects for m in self.subjects if f.id != m.id]
        self.downsample = downsample
        self.clip_hu = clip_hu
        self.cache = cache
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, subject: Subject) -> tuple[Tensor, Tensor, Tensor]:
        if subject.id in self._cache:
            return self._cache[subject.id]
        out = load_subject(subject, self.downsample, self.clip_hu)
        if self.cache:
            self._cache[subject.id] = out
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"pair index {index} out of range [0, {len(self.pairs)})")
        fixed_s, moving_s = self.pairs[index]
        fixed, fixed_label, spacing = self._load(fixed_s)
        moving, moving_label, moving_spacing = self._load(moving_s)
        if fixed.shape != moving.shape:
            raise ValueError(
                f"subjects {fixed_s.id} and {moving_s.id} have different grids "
                f"{tuple(fixed.shape[1:])} and {tuple(moving.shape[1:])}; resample them first"
            )
        return {
            "fixed": fixed,
            "moving": moving,
            "fixed_label": fixed_label,
            "moving_label": moving_label,
            "spacing": spacing,
            "pair_id": index,
            "pair": f"{fixed_s.id:04d}_{moving_s.id:04d}",
        }


# --------------------------------------------------------------------------- Lightning
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
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not isinstance(downsample, int) or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}")
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
            self.datasets[split] = PairDataset(subs, self.downsample, self.clip_hu, self.cache)


# --------------------------------------------------------------------------- synthetic pairs
class SyntheticPairDataset(Dataset):
    """Pairs made from real volumes by known random smooth deformations and intensity changes.

    Pair ``i`` uses base volume ``i % len(volumes)`` and the seed ``seed + i``, so it is the
    same on every call, worker and rank. The moving image is the base volume (optionally
    pre-deformed by a second random field, so that the moving images differ too) with a smooth
    intensity bias and noise; the fixed image is the moving one warped by the true field
    (:func:`voxelopt.phantom.make_pair`), kept as ``true_disp`` for the endpoint error.

    Args:
        volumes: ``(image (1, D, H, W) HU, label (1, D, H, W), spacing (3,) mm)`` per base
            volume, as :func:`prepare_volume` returns.
        num_pairs: number of pairs.
        seed: seed of pair 0.
        max_displacement_mm: largest displacement of the true field.
        control_spacing_mm: control-point distance of the random fields (organ scale).
        moving_displacement_mm: largest displacement of the moving image's pre-deformation
            (0 keeps the base volume as the moving image).
        intensity_change: add a smooth bias and noise to the moving image.
        bias_hu: amplitude of the smooth intensity bias.
        noise_hu: standard deviation of the noise.
    """

    def __init__(
        self,
        volumes: Sequence[tuple[Tensor, Tensor, Tensor]],
        num_pairs: int,
        seed: int = 0,
        max_displacement_mm: float = 15.0,
        control_spacing_mm: float = 40.0,
        moving_displacement_mm: float = 0.0,
        intensity_change: bool = True,
        bias_hu: float = 30.0,
        noise_hu: float = 10.0,
    ) -> None:
        if not volumes:
            raise ValueError("volumes is empty: synthetic pairs need at least one base volume")
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        for name, value in (
            ("max_displacement_mm", max_displacement_mm),
            ("moving_displacement_mm", moving_displacement_mm),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.volumes = list(volumes)
        self.num_pairs = num_pairs
        self.seed = seed
        self.max_displacement_mm = float(max_displacement_mm)
        self.control_spacing_mm = float(control_spacing_mm)
        self.moving_displacement_mm = float(moving_displacement_mm)
        self.intensity_change = intensity_change
        self.bias_hu = float(bias_hu)
        self.noise_hu = float(noise_hu)

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range [0, {self.num_pairs})")
        image, label, spacing = self.volumes[index % len(self.volumes)]
        seed = self.seed + index
        spacing_mm = tuple(float(s) for s in spacing)
        if self.moving_displacement_mm > 0:
            pre = random_smooth_displacement(
                image.shape[1:],
                self.moving_displacement_mm,
                control_spacing=self.control_spacing_mm,
                seed=-1 - seed,  # a stream of its own, disjoint from the pair seeds
                diffeomorphic=True,
                spacing=spacing_mm,
            )
            image = warp(image[None], pre, padding_mode="border")[0]
            label = warp(label[None], pre, mode="nearest", padding_mode="border")[0]
        pair = make_pair(
            image[0],
            label[0],
            self.max_displacement_mm,
            spacing_mm,
            seed=seed,
            intensity_change=self.intensity_change,
            control_spacing_mm=self.control_spacing_mm,
            bias_hu=self.bias_hu,
            noise_hu=self.noise_hu,
        )
        return {
            "fixed": pair.fixed_hu[0],
            "moving": pair.moving_hu[0],
            "fixed_label": pair.fixed_labels[0],
            "moving_label": pair.moving_labels[0],
            "spacing": spacing.float(),
            "true_disp": pair.displacement[0],
            "pair_id": index,
            "pair": f"syn{seed}",
        }


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
        if not isinstance(downsample, int) or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}")
        counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
        for name, value in counts.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.images = [Path(p) for p in images]
        self.labels = [Path(p) for p in labels]
        self.downsample = downsample
        self.size = size
        self.clip_hu = clip_hu
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
                load_volume(s.image), load_labels(s.label), self.downsample, self.clip_hu, self.size
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
