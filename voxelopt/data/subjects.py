"""The paper's 30-scan dataset on disk: finding subjects in either layout and checking files.

Two layouts are read:

* ``paper``: ``img/imgNNNN.nii.gz`` and ``label/labelNNNN.nii.gz``;
* ``learn2reg`` (AbdomenCTCT): ``imagesTr/AbdomenCTCT_NNNN_0000.nii.gz`` and
  ``labelsTr/AbdomenCTCT_NNNN_0000.nii.gz``, listed in a dataset JSON (``*_dataset.json``,
  entries under ``training`` and ``validation``) when there is one.

Every file is checked (through :func:`voxelopt.io.inspect_nifti`) before any work starts, and a
missing or malformed file is reported by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from voxelopt.io import inspect_nifti

__all__ = ["DEFAULT_SPLITS", "Layout", "Subject", "find_subjects", "validate_subjects"]

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
        image_shape = inspect_nifti(s.image, "image", full)
        label_shape = inspect_nifti(s.label, "label", full)
        if image_shape != label_shape:
            raise ValueError(
                f"label {s.label} has shape {label_shape} but its image {s.image} has {image_shape}"
            )
