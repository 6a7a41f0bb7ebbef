"""Many registration pairs: the pair lists, the Learn2Reg output names, the results folder.

What ``voxelopt register-batch`` (:mod:`voxelopt.cli.batch`) reads and writes, without the
registration itself:

* :func:`pairs_from_dataset` reads a Learn2Reg dataset JSON (``registration_val`` /
  ``registration_test``: lists of ``{"fixed": ..., "moving": ...}``, paths relative to the
  JSON's folder); label maps are the files of the same name in ``labelsTr/`` beside
  ``imagesTr/``, used when both exist. :func:`pairs_from_csv` reads a CSV with the columns
  ``fixed``, ``moving`` and optionally ``fixed_labels``, ``moving_labels`` (paths relative to
  the CSV's folder; an empty cell is no file).
* :attr:`BatchPair.disp_name` is ``disp_FIXED_MOVING.nii.gz`` (Learn2Reg's submission layout),
  ``FIXED``/``MOVING`` the case ids of :func:`case_id`.
* :class:`BatchResults` is the output folder: one field per pair, ``pairs.csv`` (one row per
  completed pair, rewritten atomically after each), ``summary.md`` and ``batch.json`` (the
  options the fields were made with). A pair is *complete* when its row is in pairs.csv and
  its field file exists; the field is renamed into place before its row is written, so a run
  killed at any moment leaves only complete pairs and temporary files that the next run
  ignores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from voxelopt.tables import markdown_table, mean_std, write_csv, write_text

__all__ = [
    "BatchPair",
    "BatchResults",
    "case_id",
    "group_by_fixed",
    "pairs_from_csv",
    "pairs_from_dataset",
]

_L2R_NAME = re.compile(r"^(?:.*_)?(\d{4})_\d{4}\.nii(?:\.gz)?$")
_NIFTI_SUFFIX = re.compile(r"\.nii(?:\.gz)?$")
#: the summary scores of pairs.csv: column, title, scale, decimals
_SUMMARY = (
    ("dice", "Dice %", 100.0, 1),
    ("hd95", "HD95 mm", 1.0, 2),
    ("sdlogj_l2r", "SDlogJ", 1.0, 3),
    ("nonpositive_jacobian", "J <= 0 %", 100.0, 3),
    ("runtime_s", "solve s", 1.0, 2),
    ("seconds", "pair s", 1.0, 2),
)


def case_id(path: str | os.PathLike) -> str:
    """``"0001"`` for a Learn2Reg name such as ``AbdomenCTCT_0001_0000.nii.gz``, else the
    file name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    match = _L2R_NAME.match(name)
    return match.group(1) if match else _NIFTI_SUFFIX.sub("", name)


@dataclass(frozen=True)
class BatchPair:
    """One pair of a batch.

    Attributes:
        index: position in the list it came from (0-based).
        fixed: fixed image path.
        moving: moving image path.
        fixed_labels: label map of ``fixed`` (``None``: no label scores).
        moving_labels: label map of ``moving`` (given exactly when ``fixed_labels`` is).
    """

    index: int
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None

    @property
    def name(self) -> str:
        """``FIXED_MOVING`` (case ids)."""
        return f"{case_id(self.fixed)}_{case_id(self.moving)}"

    @property
    def disp_name(self) -> str:
        """``disp_FIXED_MOVING.nii.gz``: the field's file name in the Learn2Reg layout."""
        return f"disp_{self.name}.nii.gz"


def _labels_beside(image: Path) -> Path | None:
    """``.../labelsTr/NAME`` for ``.../imagesTr/NAME`` (any ``images*`` folder), if it exists."""
    folder = image.parent.name
    if not folder.startswith("images"):
        return None
    candidate = image.parent.with_name("labels" + folder[len("images") :]) / image.name
    return candidate if candidate.is_file() else None


def _check_names(pairs: Sequence[BatchPair], source: str) -> list[BatchPair]:
    seen: dict[str, BatchPair] = {}
    for pair in pairs:
        other = seen.setdefault(pair.disp_name, pair)
        if other is not pair:
            raise ValueError(
                f"{source}: pairs {other.index + 1} and {pair.index + 1} would both write "
                f"{pair.disp_name} (same case ids)"
            )
    if not pairs:
        raise ValueError(f"{source} lists no pairs")
    return list(pairs)


def pairs_from_dataset(path: str | os.PathLike, split: str = "val") -> list[BatchPair]:
    """The registration pairs of a Learn2Reg dataset JSON.

    Args:
        path: the dataset JSON (e.g. ``AbdomenCTCT_dataset.json``).
        split: ``"val"`` (``registration_val``), ``"test"`` (``registration_test``) or any
            key of the JSON that holds a list of ``{"fixed", "moving"}`` entries.

    Returns:
        The pairs in the JSON's order, with label maps where ``labelsTr`` has both.

    Raises:
        FileNotFoundError: the JSON does not exist.
        ValueError: not valid JSON, no such list, an entry without ``fixed``/``moving``, or
            two pairs with the same output name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {path} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--dataset {path} is not valid JSON: {err}") from None
    key = {"val": "registration_val", "test": "registration_test"}.get(split, split)
    entries = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        lists = (
            [k for k, v in meta.items() if k.startswith("registration") and v]
            if isinstance(meta, dict)
            else []
        )
        raise ValueError(
            f"--dataset {path} has no list {key!r} (--split {split}); it has: "
            f"{', '.join(lists) or 'no registration lists'}"
        )
    pairs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"fixed", "moving"} <= set(entry):
            raise ValueError(f"--dataset {path}: {key}[{i}] needs 'fixed' and 'moving'")
        fixed, moving = (path.parent / str(entry[k]) for k in ("fixed", "moving"))
        fl, ml = _labels_beside(fixed), _labels_beside(moving)
        labelled = fl is not None and ml is not None
        pairs.append(
            BatchPair(i, fixed, moving, fl if labelled else None, ml if labelled else None)
        )
    return _check_names(pairs, f"--dataset {path}")


def pairs_from_csv(path: str | os.PathLike) -> list[BatchPair]:
    """The pairs of a CSV with columns ``fixed``, ``moving`` [, ``fixed_labels``,
    ``moving_labels``]; relative paths are relative to the CSV's folder.

    Raises:
        FileNotFoundError: the CSV does not exist.
        ValueError: a missing column or cell, one label map without the other, or two pairs
            with the same output name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if not {"fixed", "moving"} <= columns:
            raise ValueError(f"--pairs {path} needs the columns fixed and moving, got {columns}")
        rows = list(reader)

    def resolve(text: str | None) -> Path | None:
        text = (text or "").strip()
        return path.parent / text if text else None

    pairs = []
    for i, row in enumerate(rows):
        fixed, moving = resolve(row["fixed"]), resolve(row["moving"])
        fl, ml = resolve(row.get("fixed_labels")), resolve(row.get("moving_labels"))
        if fixed is None or moving is None:
            raise ValueError(f"--pairs {path}: row {i + 2} has an empty fixed or moving cell")
        if (fl is None) != (ml is None):
            raise ValueError(f"--pairs {path}: row {i + 2} gives one label map without the other")
        pairs.append(BatchPair(i, fixed, moving, fl, ml))
    return _check_names(pairs, f"--pairs {path}")


def group_by_fixed(pairs: Iterable[BatchPair]) -> list[BatchPair]:
    """The pairs reordered so that those sharing a fixed image follow each other (in the
    order the fixed images first appear): the fixed image's features are computed once."""
    groups: dict[Path, list[BatchPair]] = {}
    for pair in pairs:
        groups.setdefault(pair.fixed.resolve(), []).append(pair)
    return [p for group in groups.values() for p in group]


def _flat(options: dict, prefix: str = "") -> dict:
    """``{"config": {"levels": 5}}`` -> ``{"config.levels": 5}``."""
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


class BatchResults:
    """The output folder of a batch: fields, ``pairs.csv``, ``summary.md``, ``batch.json``.

    Args:
        out_dir: the folder (created; its parent must exist).
        options: what the fields depend on (features, solver configuration, ...). A folder
            made with other options is refused rather than mixed.
        pairs: the batch's pairs: pairs.csv lists them in this order (rows of pairs not in
            it, from an earlier run, after them).

    Raises:
        FileNotFoundError: the parent of ``out_dir`` does not exist.
        ValueError: ``out_dir`` is a file, or holds results made with other options.
    """

    CSV_NAME, SUMMARY_NAME, OPTIONS_NAME = "pairs.csv", "summary.md", "batch.json"

    def __init__(
        self, out_dir: str | os.PathLike, options: dict, pairs: Sequence[BatchPair] = ()
    ) -> None:
        self.out_dir = Path(out_dir)
        if not self.out_dir.parent.is_dir():
            raise FileNotFoundError(f"--out-dir {out_dir}: its parent folder does not exist")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"--out-dir {out_dir} exists and is not a folder")
        self.out_dir.mkdir(exist_ok=True)
        self.options = json.loads(json.dumps(options, default=str))
        self._check_options()
        self._order = {p.disp_name: p.index for p in pairs}
        self.rows: dict[str, dict] = {}
        csv_path = self.out_dir / self.CSV_NAME
        if csv_path.is_file():
            with open(csv_path, newline="") as f:
                self.rows = {row["disp"]: row for row in csv.DictReader(f) if row.get("disp")}

    def _check_options(self) -> None:
        path = self.out_dir / self.OPTIONS_NAME
        if path.is_file():
            try:
                before = json.loads(path.read_text()).get("options")
            except (OSError, ValueError, AttributeError):
                before = None
            if before is not None and before != self.options:
                old, new = _flat(before), _flat(self.options)
                changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
                raise ValueError(
                    f"--out-dir {self.out_dir} holds fields made with other options "
                    f"({', '.join(changed)}): give a new --out-dir to keep both"
                )
        write_text(json.dumps({"options": self.options}, indent=2) + "\n", path)

    def path(self, pair: BatchPair) -> Path:
        """Where the pair's field goes."""
        return self.out_dir / pair.disp_name

    def is_complete(self, pair: BatchPair) -> bool:
        """Its row is in pairs.csv and its field exists."""
        return pair.disp_name in self.rows and self.path(pair).is_file()

    def add(self, pair: BatchPair, scores: dict, seconds: float) -> dict:
        """Record a completed pair (its field already written) and rewrite pairs.csv."""
        row = {
            "pair": pair.name,
            "fixed": pair.fixed.name,
            "moving": pair.moving.name,
            "disp": pair.disp_name,
            **scores,
            "seconds": seconds,
        }
        self.rows[pair.disp_name] = row
        last = len(self._order)
        ordered = sorted(self.rows.values(), key=lambda r: self._order.get(r["disp"], last))
        write_csv(ordered, self.out_dir / self.CSV_NAME, self._columns())
        return row

    def _columns(self) -> list[str]:
        labels = sorted(
            {int(k[5:]) for row in self.rows.values() for k in row if re.fullmatch(r"dice_\d+", k)}
        )
        from_labels = [f"{s}_{lab}" for s in ("dice", "hd95") for lab in labels]
        summary = [c for c, *_ in _SUMMARY if c != "seconds"] + ["sdlogj", "epe_mm"]
        return ["pair", "fixed", "moving", "disp", *from_labels, *summary, "seconds"]

    def summary(self, pairs: Sequence[BatchPair], failures: Sequence[tuple[BatchPair, str]]) -> str:
        """``summary.md``: scores of the listed pairs (mean ± sd) and the failures."""
        rows = [self.rows[p.disp_name] for p in pairs if self.is_complete(p)]
        head = (
            f"# voxelopt register-batch\n\n{len(rows)} of {len(pairs)} pairs complete"
            f"{f', {len(failures)} failed' if failures else ''}; options: "
            + ", ".join(f"{k} {v}" for k, v in self.options.items() if k != "config")
            + "\n"
        )
        if not rows:
            return head
        cells = {"pairs": len(rows)}
        for column, title, scale, digits in _SUMMARY:
            cells[title] = mean_std([_number(r.get(column)) for r in rows], digits, scale)
        text = head + "\n" + markdown_table([cells], fmt=str)
        labels = [c[5:] for c in self._columns() if c.startswith("dice_")]
        if labels:
            per_label = [
                {
                    "label": lab,
                    "Dice %": mean_std([_number(r.get(f"dice_{lab}")) for r in rows], 1, 100.0),
                    "HD95 mm": mean_std([_number(r.get(f"hd95_{lab}")) for r in rows], 2),
                }
                for lab in labels
            ]
            text += "\n" + markdown_table(per_label, fmt=str)
        if failures:
            text += "\nFailed pairs:\n\n" + "".join(f"- {p.name}: {why}\n" for p, why in failures)
        return text

    def write_summary(self, pairs, failures) -> Path:
        """Write :meth:`summary` to ``summary.md`` (atomically)."""
        return write_text(self.summary(pairs, failures), self.out_dir / self.SUMMARY_NAME)
