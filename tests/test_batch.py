"""`voxelopt register-batch` end to end, and the pair lists and results of voxelopt.batch."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voxelopt.batch import (
    BatchPair,
    BatchResults,
    case_id,
    group_by_fixed,
    pairs_from_csv,
    pairs_from_dataset,
)
from voxelopt.cli import main
from voxelopt.phantom import make_phantom

SHAPE = (32, 28, 36)
SPACING = 4.0
FAST = ["--levels", "2", "--features", "raw", "--affine", "none", "--quiet"]
PAIRS = [(1, 2), (2, 3), (1, 3)]


def _name(case: int) -> str:
    return f"AbdomenCTCT_{case:04d}_0000.nii.gz"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A Learn2Reg layout: 3 phantom cases in imagesTr/labelsTr and a dataset JSON."""
    root = tmp_path_factory.mktemp("AbdomenCTCT")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    for case in (1, 2, 3):
        hu, labels = make_phantom(SHAPE, spacing=SPACING, seed=case)
        nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), root / "imagesTr" / _name(case))
        nib.save(nib.Nifti1Image(labels.astype(np.int16), affine), root / "labelsTr" / _name(case))
    entries = [
        {"fixed": f"./imagesTr/{_name(f)}", "moving": f"./imagesTr/{_name(m)}"} for f, m in PAIRS
    ]
    meta = {"name": "AbdomenCTCT", "registration_val": entries, "registration_test": entries[:1]}
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta))
    return root


def batch(source: list, out: Path, *extra) -> int:
    return main(["register-batch", *map(str, source), "--out-dir", str(out), *FAST, *extra])


def read_rows(out: Path) -> list[dict]:
    with open(out / "pairs.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def count_runs(monkeypatch):
    """Count the registrations register-batch runs (the real ones still run)."""
    from voxelopt.cli import batch as cli_batch

    calls = []
    real = cli_batch.register_volumes

    def counted(fixed, moving, **kw):
        calls.append(Path(moving.path).name if getattr(moving, "path", None) else moving)
        return real(fixed, moving, **kw)

    monkeypatch.setattr(cli_batch, "register_volumes", counted)
    return calls


def test_dataset_json_learn2reg_layout(dataset, tmp_path, capsys):
    out = tmp_path / "submission"
    assert batch(["--dataset", dataset / "AbdomenCTCT_dataset.json"], out) == 0
    names = {f"disp_{f:04d}_{m:04d}.nii.gz" for f, m in PAIRS}
    assert {p.name for p in out.glob("disp_*")} == names
    disp = nib.load(out / "disp_0001_0002.nii.gz")
    assert disp.shape == (*SHAPE, 3) and disp.get_data_dtype() == np.float32
    np.testing.assert_allclose(disp.affine, np.diag([SPACING] * 3 + [1.0]))
    rows = read_rows(out)
    assert [r["pair"] for r in rows] == ["0001_0002", "0002_0003", "0001_0003"]  # list order
    assert all(0.0 < float(r["dice"]) <= 1.0 and float(r["hd95"]) >= 0.0 for r in rows)
    assert {"dice_1", "hd95_1", "sdlogj_l2r", "nonpositive_jacobian", "seconds"} <= set(rows[0])
    summary = (out / "summary.md").read_text()
    assert "3 of 3 pairs complete" in summary and "| Dice % |" in summary
    assert "3 pairs registered" in capsys.readouterr().out


def test_test_split_and_limit(dataset, tmp_path):
    out = tmp_path / "out"
    assert batch(["--dataset", dataset / "AbdomenCTCT_dataset.json", "--split", "test"], out) == 0
    assert [p.name for p in out.glob("disp_*")] == ["disp_0001_0002.nii.gz"]


def test_csv_of_pairs_with_and_without_labels(dataset, tmp_path):
    table = tmp_path / "pairs.csv"
    images, labels = "AbdomenCTCT/imagesTr", "AbdomenCTCT/labelsTr"
    (tmp_path / "AbdomenCTCT").symlink_to(dataset)
    table.write_text(
        "fixed,moving,fixed_labels,moving_labels\n"
        f"{images}/{_name(1)},{images}/{_name(2)},{labels}/{_name(1)},{labels}/{_name(2)}\n"
        f"{images}/{_name(3)},{images}/{_name(1)},,\n"
    )
    out = tmp_path / "out"
    assert batch(["--pairs", table], out) == 0
    rows = {r["pair"]: r for r in read_rows(out)}
    assert set(rows) == {"0001_0002", "0003_0001"}
    assert float(rows["0001_0002"]["dice"]) > 0
    assert rows["0003_0001"]["dice"] in ("", "nan")  # no labels: no Dice


def test_resume_skips_completed_pairs(dataset, tmp_path, count_runs):
    source = ["--dataset", dataset / "AbdomenCTCT_dataset.json"]
    out = tmp_path / "out"
    assert batch(source, out, "--limit", "1") == 0
    first = out / "disp_0001_0002.nii.gz"
    stamp = first.stat().st_mtime_ns
    assert len(count_runs) == 1
    assert batch(source, out) == 0
    assert len(count_runs) == 3 and first.stat().st_mtime_ns == stamp
    assert batch(source, out) == 0  # all complete: nothing runs
    assert len(count_runs) == 3
    (out / "disp_0002_0003.nii.gz").unlink()  # a field gone: that pair (only) again
    assert batch(source, out) == 0
    assert len(count_runs) == 4 and count_runs[-1] == _name(3)
    assert len(read_rows(out)) == 3 and first.stat().st_mtime_ns == stamp


def test_other_options_are_refused(dataset, tmp_path, capsys):
    source = ["--dataset", dataset / "AbdomenCTCT_dataset.json", "--limit", "1"]
    out = tmp_path / "out"
    assert batch(source, out) == 0
    capsys.readouterr()
    args = ["register-batch", *map(str, source), "--out-dir", str(out), *FAST, "--levels", "3"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "holds fields made with other options (config.levels)" in err[0]


def test_a_bad_pair_is_one_line_and_the_others_complete(dataset, tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    images = dataset / "imagesTr"
    table.write_text(
        "fixed,moving\n"
        f"{images / _name(1)},{images / _name(2)}\n"
        f"{images / _name(1)},{images / 'missing.nii.gz'}\n"
        f"{images / _name(2)},{images / _name(3)}\n"
    )
    out = tmp_path / "out"
    assert batch(["--pairs", table], out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("voxelopt: error: pair 0001_missing: ") and "missing.nii.gz" in err[0]
    assert err[1].startswith("voxelopt: error: 1 of 3 pairs failed (0001_missing)")
    assert [r["pair"] for r in read_rows(out)] == ["0001_0002", "0002_0003"]
    summary = (out / "summary.md").read_text()
    assert "2 of 3 pairs complete, 1 failed" in summary and "- 0001_missing: " in summary


def test_fixed_features_are_computed_once_per_fixed_image(dataset, tmp_path, monkeypatch):
    from voxelopt.features.raw import RawIntensity

    calls = []
    real = RawIntensity.extract

    def counted(self, image):
        calls.append(tuple(image.shape))
        return real(self, image)

    monkeypatch.setattr(RawIntensity, "extract", counted)
    assert batch(["--dataset", dataset / "AbdomenCTCT_dataset.json"], tmp_path / "out") == 0
    # pairs 1->2, 1->3 (grouped by fixed image), 2->3: fixed 1 once, fixed 2 once, 3 moving
    assert len(calls) == 5


def test_interruption_keeps_the_completed_pairs(dataset, tmp_path, capsys, monkeypatch):
    from voxelopt.cli import batch as cli_batch
    from voxelopt.outputs import Interrupted

    real, calls = cli_batch.register_volumes, []

    def interrupted_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(cli_batch, "register_volumes", interrupted_second)
    source = ["--dataset", dataset / "AbdomenCTCT_dataset.json"]
    out = tmp_path / "out"
    assert batch(source, out) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"voxelopt: interrupted by SIGINT; {out} keeps the pairs completed so far"]
    assert [r["pair"] for r in read_rows(out)] == ["0001_0002"]
    assert sorted(p.name for p in out.iterdir()) == [
        "batch.json",
        "disp_0001_0002.nii.gz",
        "pairs.csv",
    ]
    monkeypatch.setattr(cli_batch, "register_volumes", real)
    assert batch(source, out) == 0 and len(read_rows(out)) == 3


# --- voxelopt.batch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("AbdomenCTCT_0001_0000.nii.gz", "0001"),
        ("LungCT_0012_0001.nii.gz", "0012"),
        ("case_7.nii", "case_7"),
        ("fixed.nii.gz", "fixed"),
    ],
)
def test_case_id(name, expected):
    assert case_id(Path("/data") / name) == expected


def test_dataset_labels_only_when_both_exist(dataset, tmp_path):
    pairs = pairs_from_dataset(dataset / "AbdomenCTCT_dataset.json")
    assert [p.disp_name for p in pairs] == [f"disp_{f:04d}_{m:04d}.nii.gz" for f, m in PAIRS]
    assert pairs[0].fixed_labels == dataset / "labelsTr" / _name(1)
    root = tmp_path / "partial"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "labelsTr" / _name(1)).write_bytes(b"")
    entry = {"fixed": f"imagesTr/{_name(1)}", "moving": f"imagesTr/{_name(2)}"}
    (root / "d.json").write_text(json.dumps({"registration_val": [entry]}))
    (pair,) = pairs_from_dataset(root / "d.json")
    assert pair.fixed_labels is None and pair.moving_labels is None


@pytest.mark.parametrize(
    "meta, fragment",
    [
        ({"registration_val": []}, "lists no pairs"),
        ({"training": []}, "has no list 'registration_val' (--split val); it has: no reg"),
        ({"registration_val": [{"fixed": "a.nii.gz"}]}, "registration_val[0] needs 'fixed'"),
        (
            {"registration_val": [{"fixed": "a/x_0001_0000.nii.gz", "moving": "m.nii.gz"}] * 2},
            "pairs 1 and 2 would both write disp_0001_m.nii.gz",
        ),
    ],
)
def test_dataset_errors(tmp_path, meta, fragment):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="^--dataset") as exc:
        pairs_from_dataset(path)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_dataset_missing_and_not_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pairs_from_dataset(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        pairs_from_dataset(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("fixed,image\na,b\n", "needs the columns fixed and moving"),
        ("fixed,moving\na,\n", "row 2 has an empty fixed or moving cell"),
        ("fixed,moving,fixed_labels,moving_labels\na,b,c,\n", "row 2 gives one label map"),
    ],
)
def test_csv_errors(tmp_path, text, fragment):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        pairs_from_csv(path)


def test_csv_paths_are_relative_to_the_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.csv"
    path.write_text("fixed,moving\nimg/a.nii.gz,/abs/b.nii.gz\n")
    (pair,) = pairs_from_csv(path)
    assert pair.fixed == tmp_path / "sub" / "img" / "a.nii.gz"
    assert pair.moving == Path("/abs/b.nii.gz") and pair.name == "a_b"


def test_group_by_fixed_keeps_first_appearance_order():
    names = [("a", "b"), ("c", "a"), ("a", "c"), ("c", "b"), ("b", "a")]
    pairs = [BatchPair(i, Path(f"{f}.nii"), Path(f"{m}.nii")) for i, (f, m) in enumerate(names)]
    assert [p.index for p in group_by_fixed(pairs)] == [0, 2, 1, 3, 4]


def test_results_rows_and_completeness(tmp_path):
    pairs = [BatchPair(i, Path(f"f{i}.nii"), Path(f"m{i}.nii")) for i in range(3)]
    results = BatchResults(tmp_path / "out", {"features": "raw"}, pairs)
    assert not results.is_complete(pairs[0])
    results.path(pairs[2]).write_bytes(b"x")
    results.add(pairs[2], {"dice": 0.5, "dice_3": 0.5, "hd95_3": 1.0}, 1.0)
    results.path(pairs[0]).write_bytes(b"x")
    results.add(pairs[0], {"dice": 0.7, "dice_1": 0.7, "hd95_1": 2.0}, 2.0)
    again = BatchResults(tmp_path / "out", {"features": "raw"}, pairs)  # read back
    assert [again.is_complete(p) for p in pairs] == [True, False, True]
    rows = read_rows(tmp_path / "out")
    assert [r["pair"] for r in rows] == ["f0_m0", "f2_m2"]
    columns = ["pair", "fixed", "moving", "disp", "dice_1", "dice_3", "hd95_1", "hd95_3"]
    assert list(rows[0])[:8] == columns
    summary = again.summary(pairs, [(pairs[1], "boom")])
    assert "2 of 3 pairs complete, 1 failed" in summary and "60.0 ± 14.1" in summary
    assert "- f1_m1: boom" in summary
    results.path(pairs[0]).unlink()  # a row without its field is not complete
    assert not BatchResults(tmp_path / "out", {"features": "raw"}, pairs).is_complete(pairs[0])
    with pytest.raises(ValueError, match=r"other options \(features\)"):
        BatchResults(tmp_path / "out", {"features": "mind"}, pairs)
