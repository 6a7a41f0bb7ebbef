"""`voxelopt register` and `voxelopt demo` end to end, and every bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voxelopt.cli import build_parser, main
from voxelopt.phantom import make_pair, make_phantom

SHAPE = (40, 36, 40)
# the phantom pair shares one grid: most tests look at the deformable stage alone
FAST = ["--levels", "3", "--features", "raw", "--quiet", "--affine", "none"]
OUTPUTS = {"moved.nii.gz", "displacement.nii.gz", "report.json", "registration.png"}


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A phantom pair written with an LPS, anisotropic affine (not the identity)."""
    folder = tmp_path_factory.mktemp("pair")
    hu, labels = make_phantom(SHAPE, spacing=(4.0, 4.0, 4.0), seed=0)
    pair = make_pair(hu, labels, max_displacement_mm=12.0, spacing=4.0, seed=1)
    affine = np.array([[-4.0, 0, 0, 90.0], [0, -4.0, 0, 60.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1]])
    files = {}
    for name, data, dtype in [
        ("fixed", pair.fixed_hu, np.float32),
        ("moving", pair.moving_hu, np.float32),
        ("fixed_labels", pair.fixed_labels, np.int16),
        ("moving_labels", pair.moving_labels, np.int16),
    ]:
        # canonical (RAS) array -> LPS file axes: flip the first two axes
        array = np.asarray(data[0, 0]).astype(dtype)[::-1, ::-1, :]
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), path)
        files[name] = path
    files["affine"] = affine
    return files


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def register_args(files, out_dir, labels=True):
    args = [
        "register",
        "--fixed",
        files["fixed"],
        "--moving",
        files["moving"],
        "--out-dir",
        out_dir,
    ]
    if labels:
        args += ["--fixed-labels", files["fixed_labels"], "--moving-labels", files["moving_labels"]]
    return args + FAST


class TestRegister:
    def test_outputs_and_affine(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        code, stdout, _ = run(register_args(pair_files, out), capsys)
        assert code == 0
        assert {p.name for p in out.iterdir()} == OUTPUTS | {"moved_labels.nii.gz"}
        fixed = nib.load(pair_files["fixed"])
        for name in ("moved.nii.gz", "moved_labels.nii.gz"):
            img = nib.load(out / name)
            assert img.shape == fixed.shape
            np.testing.assert_allclose(img.affine, pair_files["affine"])
        disp = nib.load(out / "displacement.nii.gz")
        assert disp.shape == (*fixed.shape, 3)
        np.testing.assert_allclose(disp.affine, pair_files["affine"])
        report = json.loads((out / "report.json").read_text())
        assert report["runtime_s"] > 0
        m = report["metrics"]
        assert {"dice", "dice_per_label", "hd95", "hd95_per_label_mm", "sdlogj_l2r"} <= set(m)
        assert "nonpositive_jacobian" in m
        assert "Dice" in stdout
        assert (out / "registration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_default_prealigns_and_reports_coverage(self, pair_files, tmp_path, capsys):
        """Without --affine the pair is pre-aligned (affine) and the report says where the
        moving image had data."""
        out = tmp_path / "out"
        args = register_args(pair_files, out)
        args = args[: args.index("--affine")]  # the default
        assert run(args, capsys)[0] == 0
        assert {"affine.txt", "affine.tfm"} <= {p.name for p in out.iterdir()}
        report = json.loads((out / "report.json").read_text())
        assert report["affine"]["mode"] == "affine"
        coverage = report["coverage"]
        assert coverage["field_of_view"] is True
        assert 0.9 < coverage["share_of_working_grid"]["moving"] <= 1.0
        assert coverage["share_of_working_grid"]["fixed"] == 1.0
        assert coverage["masks"] == {"fixed": None, "moving": None}

    def test_registration_improves_overlap(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        assert run(register_args(pair_files, out), capsys)[0] == 0
        fixed_labels = nib.load(pair_files["fixed_labels"]).get_fdata()
        moving_labels = nib.load(pair_files["moving_labels"]).get_fdata()
        moved_labels = nib.load(out / "moved_labels.nii.gz").get_fdata()

        def overlap(a, b):
            return np.mean(
                [
                    2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
                    for k in np.unique(b)
                    if k > 0
                ]
            )

        assert overlap(moved_labels, fixed_labels) > overlap(moving_labels, fixed_labels) + 0.04

    def test_displacement_file_convention(self, pair_files, tmp_path, capsys):
        """Warping the moving file by the written field (file axes) gives moved.nii.gz."""
        from scipy.ndimage import map_coordinates

        out = tmp_path / "out"
        assert run(register_args(pair_files, out, labels=False), capsys)[0] == 0
        moving = nib.load(pair_files["moving"]).get_fdata()
        disp = nib.load(out / "displacement.nii.gz").get_fdata()
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in moving.shape], indexing="ij"))
        coords = grid + np.moveaxis(disp, -1, 0)
        resampled = map_coordinates(moving, coords, order=1, mode="nearest")
        moved = nib.load(out / "moved.nii.gz").get_fdata()
        inner = (slice(2, -2),) * 3
        np.testing.assert_allclose(resampled[inner], moved[inner], atol=1.0)

    def test_moving_on_other_grid_is_resampled(self, pair_files, tmp_path, capsys):
        img = nib.load(pair_files["moving"])
        shifted = img.affine.copy()
        shifted[:3, 3] += 8.0  # a different grid of the same scanner space
        other = tmp_path / "moving_other.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), other)
        out = tmp_path / "out"
        args = ["register", "--fixed", pair_files["fixed"], "--moving", other, "--out-dir", out]
        assert run(args + FAST, capsys)[0] == 0
        report = json.loads((out / "report.json").read_text())
        assert report["inputs"]["moving_resampled_to_fixed_grid"] is True
        assert nib.load(out / "moved.nii.gz").shape == nib.load(pair_files["fixed"]).shape


def _bad_file(tmp_path, kind, pair_files):
    affine = pair_files["affine"]
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "four_d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), affine), path)
    elif kind == "nan":
        data = np.asarray(nib.load(pair_files["moving"]).dataobj).copy()
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, affine), path)
    elif kind == "not_nifti":
        path.write_bytes(b"this is not a NIfTI file")
    elif kind == "small_labels":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine), path)
    return path


class TestBadInput:
    @pytest.mark.parametrize(
        "change, match",
        [
            (lambda a, t, f: a.__setitem__(2, t / "missing.nii.gz"), "missing.nii.gz"),
            (lambda a, t, f: a.__setitem__(4, _bad_file(t, "four_d", f)), "3"),
            (lambda a, t, f: a.__setitem__(4, _bad_file(t, "nan", f)), "NaN"),
            (lambda a, t, f: a.__setitem__(4, _bad_file(t, "not_nifti", f)), "not_nifti"),
            (lambda a, t, f: a.__setitem__(10, _bad_file(t, "small_labels", f)), "labels"),
            (lambda a, t, f: a.extend(["--window", "800", "-500"]), "window"),
            (lambda a, t, f: a.extend(["--weights", t / "none.pth"]), "weights"),
            (lambda a, t, f: a.extend(["--features", "universal"]), "--weights"),
        ],
        ids=["missing", "4d", "nan", "not-nifti", "label-grid", "window", "weights", "universal"],
    )
    def test_one_line_error_exit_2_nothing_written(
        self, pair_files, tmp_path, capsys, change, match
    ):
        out = tmp_path / "out"
        args = register_args(pair_files, out)
        change(args, tmp_path, pair_files)
        code, stdout, stderr = run(args, capsys)
        assert code == 2
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("voxelopt: error:")
        assert match.lower() in lines[0].lower()
        assert not out.exists() or not any(out.iterdir())

    @pytest.mark.parametrize(
        "extra", [["--levels", "0"], ["--features", "sift"], ["--device", "tpu"], ["--argmin", "x"]]
    )
    def test_out_of_range_options(self, pair_files, tmp_path, capsys, extra):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in register_args(pair_files, out) + extra])
        assert exc.value.code == 2
        assert not out.exists()

    def test_cuda_unavailable(self, pair_files, tmp_path, capsys):
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        out = tmp_path / "out"
        code, _, stderr = run(register_args(pair_files, out) + ["--device", "cuda"], capsys)
        assert code == 2 and "cuda" in stderr.lower()
        assert not out.exists() or not any(out.iterdir())


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, stderr = run(
        ["demo", "--out-dir", out, "--shape", "40", "40", "40", "--levels", "3"], capsys
    )
    assert code == 0
    assert OUTPUTS | {"moved_labels.nii.gz", "inputs"} == {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["metrics"]["dice"] <= 1
    assert "initial Dice" in stderr


@pytest.mark.slow
def test_demo_from_real_ct(ct_dir, tmp_path, capsys):
    out = tmp_path / "demo_ct"
    args = ["demo", "--ct", ct_dir / "ct.nii.gz", "--ct-labels", ct_dir / "labels_btcv13.nii.gz"]
    code, _, stderr = run(args + ["--out-dir", out, "--features", "raw", "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    initial = float(stderr.split("initial Dice ")[1].split(" %")[0]) / 100
    assert report["metrics"]["dice"] > initial + 0.05
    assert nib.load(out / "moved.nii.gz").shape == nib.load(ct_dir / "ct.nii.gz").shape


def test_demo_labels_without_ct(tmp_path, capsys):
    code, _, stderr = run(["demo", "--out-dir", tmp_path / "d", "--ct-labels", "x.nii.gz"], capsys)
    assert code == 2 and "--ct-labels needs --ct" in stderr


def test_register_with_universal_checkpoint(pair_files, tmp_path, capsys):
    """`--features universal --weights PATH` reads a checkpoint in the published layout."""
    import torch

    from voxelopt.features import UniversalNet

    torch.manual_seed(0)
    net = UniversalNet()
    # the published layout: {"net": {"module.backbone.<...>", "module.precls_conv.<i>..."}}
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    assert all(k.startswith(("module.backbone.", "module.precls_conv.")) for k in state)
    path = tmp_path / "universal.pth"
    torch.save({"net": state}, path)
    out = tmp_path / "out"
    args = register_args(pair_files, out, labels=False)
    args[args.index("raw")] = "universal"
    code, _, stderr = run(args + ["--weights", path], capsys)
    assert code == 0, stderr
    assert json.loads((out / "report.json").read_text())["features"] == "universal"


# --- issue 10: complete outputs, progress, threads, one-line errors, warnings, signals -----


def error_line(stderr: str) -> str:
    """The one line ``voxelopt: error: ...`` that stderr must consist of."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("voxelopt: error: "), lines[0]
    return lines[0]


def previous_run(out):
    """A complete earlier run in ``out`` (with labels); returns its files and contents."""
    out.mkdir()
    files = ["displacement.nii.gz", "moved.nii.gz", "moved_labels.nii.gz", "registration.png"]
    for name in files:
        (out / name).write_text(f"old {name}")
    (out / "report.json").write_text(json.dumps({"complete": True, "files": files}))
    return {p.name: p.read_text() for p in out.iterdir()}


def contents(out):
    return {p.name: p.read_text() for p in out.iterdir()} if out.exists() else None


def hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


class TestCompleteOutputs:
    def test_rerun_without_labels_replaces_the_whole_set(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        assert run(register_args(pair_files, out), capsys)[0] == 0
        assert (out / "moved_labels.nii.gz").exists()
        assert run(register_args(pair_files, out, labels=False), capsys)[0] == 0
        assert {p.name for p in out.iterdir()} == OUTPUTS  # no moved_labels of the first run
        report = strict_json(out / "report.json")
        assert report["complete"] is True
        assert report["files"] == sorted(OUTPUTS - {"report.json"})
        assert report["inputs"]["fixed_labels"] is None
        assert hidden(tmp_path) == []

    def test_report_is_strict_json_with_reasons(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        assert run(register_args(pair_files, out, labels=False), capsys)[0] == 0
        report = strict_json(out / "report.json")
        assert report["metrics"]["dice"] is None and report["metrics"]["hd95"] is None
        assert "label maps" in report["metrics"]["undefined"]["dice"]
        assert report["grids"]["fixed"]["shape"] == list(SHAPE)
        assert report["grids"]["metrics"]["grid"] == "working"
        assert report["spacing"] == "auto" and report["threads"] >= 1
        stages = {"loading", "resampling", "features", "solving", "metrics", "writing"}
        assert stages <= set(report["stages_s"])

    def test_demo_inputs_are_part_of_the_set(self, tmp_path, capsys):
        out = tmp_path / "demo"
        args = ["demo", "--out-dir", out, "--shape", "40", "40", "40", "--levels", "3", "--quiet"]
        assert run(args, capsys)[0] == 0
        report = strict_json(out / "report.json")
        assert "inputs/fixed.nii.gz" in report["files"]
        assert report["inputs"]["fixed"] == str(out.absolute() / "inputs" / "fixed.nii.gz")
        listed = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert listed == set(report["files"]) | {"report.json"}


class TestProgressAndThreads:
    def test_every_stage_starts_and_ends(self, pair_files, tmp_path, capsys):
        args = register_args(pair_files, tmp_path / "out")
        args.remove("--quiet")
        code, _, stderr = run(args, capsys)
        assert code == 0
        for stage in ("loading", "resampling", "features", "solving", "metrics", "writing"):
            assert re.search(rf"^\[ *\d+\.\d s\] {stage}", stderr, re.M), stage
            assert re.search(rf"^\[ *\d+\.\d s\] {stage} done in \d+\.\d s$", stderr, re.M)
        for level in (1, 2, 3):
            assert f"level {level} of 3 (pyramid level {3 - level}) done in" in stderr
        assert "complete: 5 files in" in stderr

    def test_quiet_prints_nothing_on_stderr(self, pair_files, tmp_path, capsys):
        args = register_args(pair_files, tmp_path / "out", labels=False)
        code, stdout, stderr = run(args, capsys)
        assert code == 0 and stderr == "" and "runtime" in stdout

    def test_threads_default_to_the_available_cores(self, pair_files, tmp_path):
        args = build_parser().parse_args([str(a) for a in register_args(pair_files, tmp_path)])
        assert args.threads == len(os.sched_getaffinity(0))

    def test_result_does_not_depend_on_threads(self, pair_files, tmp_path, capsys):
        before = torch.get_num_threads()
        fields = []
        for threads in (1, 2):
            out = tmp_path / f"t{threads}"
            args = register_args(pair_files, out, labels=False) + ["--threads", threads]
            assert run(args, capsys)[0] == 0
            assert strict_json(out / "report.json")["threads"] == threads
            fields.append(nib.load(out / "displacement.nii.gz").get_fdata())
        assert torch.get_num_threads() == before  # restored for an in-process caller
        # the same arithmetic in another order: equal to float32 rounding (measured 7e-7 voxels)
        np.testing.assert_allclose(fields[0], fields[1], rtol=0, atol=1e-4)


def _moved_file(tmp_path, pair_files, name, shift_mm=0.0, data=None, dtype=None):
    """A copy of the moving image (or ``data``) on its grid shifted by ``shift_mm``."""
    img = nib.load(pair_files["moving"])
    affine = img.affine.copy()
    affine[:3, 3] += shift_mm
    array = np.asarray(img.dataobj) if data is None else data
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array.astype(dtype or array.dtype), affine), path)
    return path


def _labels_from_image(tmp_path, pair_files):
    """The fixed CT given as labels: rounded HU, on the fixed grid."""
    img = nib.load(pair_files["fixed"])
    data = np.round(np.asarray(img.dataobj))
    path = tmp_path / "ct_as_labels.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.int16), img.affine), path)
    return path


def _set(option, value):
    def change(args, tmp_path, files):
        args[args.index(option) + 1] = value(tmp_path, files)

    return change


def _add(*extra):
    def change(args, tmp_path, files):
        args.extend(e(tmp_path, files) if callable(e) else e for e in extra)

    return change


def _drop(option):
    def change(args, tmp_path, files):
        i = args.index(option)
        del args[i : i + 2]

    return change


def _chain(*changes):
    def change(args, tmp_path, files):
        for c in changes:
            c(args, tmp_path, files)

    return change


def _many_labels(tmp_path, files):
    """1500 distinct non-negative values on the moving grid (an image, not labels)."""
    data = (np.arange(np.prod(SHAPE)) % 1500).reshape(SHAPE)
    return _moved_file(tmp_path, files, "many.nii.gz", data=data, dtype=np.int16)


def _not_a_checkpoint(tmp_path, files):
    path = tmp_path / "weights.pth"
    path.write_text("this is not a checkpoint")
    return path


class TestOneLineErrors:
    @pytest.mark.parametrize(
        "change, fragment",
        [
            (
                _add("--features", "obelisk", "--weights", _not_a_checkpoint),
                "is not a checkpoint of the obelisk network",
            ),
            (
                _chain(
                    _drop("--fixed-labels"),
                    _drop("--moving-labels"),
                    _set("--moving", lambda t, f: _moved_file(t, f, "far.nii.gz", 1000.0)),
                ),
                "--fixed and --moving do not overlap in world space",
            ),
            (
                _set(
                    "--fixed-labels",
                    lambda t, f: _moved_file(
                        t, f, "neg.nii.gz", data=np.full(SHAPE, -1), dtype=np.int16
                    ),
                ),
                "--fixed-labels must hold labels >= 0 (0 = background), got values down to -1",
            ),
            (
                _set("--fixed-labels", _labels_from_image),
                "is it an image rather than a label map?",
            ),
            (
                _set("--moving-labels", _many_labels),
                "--moving-labels must hold at most 1000 distinct labels, got 1500",
            ),
            (_drop("--moving-labels"), "--fixed-labels needs --moving-labels too"),
            (_drop("--fixed-labels"), "--moving-labels needs --fixed-labels too"),
            (
                _add("--levels", "5"),
                "--levels 5 makes the coarsest level 3x3x3 voxels for the working grid 40x36x40",
            ),
            (_add("--spacing", "100"), "is smaller than the pyramid needs"),
            (_add("--downsample", "4"), "--downsample was replaced by --spacing MM"),
        ],
        ids=[
            "weights-not-checkpoint",
            "no-overlap",
            "negative-labels",
            "ct-as-labels",
            "too-many-labels",
            "fixed-labels-alone",
            "moving-labels-alone",
            "too-many-levels",
            "spacing-too-coarse",
            "downsample-gone",
        ],
    )
    def test_input_error(self, pair_files, tmp_path, capsys, change, fragment):
        out = tmp_path / "out"
        args = register_args(pair_files, out)
        change(args, tmp_path, pair_files)
        code, stdout, stderr = run(args, capsys)
        assert code == 2
        assert fragment in error_line(stderr)
        assert not out.exists() and hidden(tmp_path) == []

    def test_levels_message_names_the_usable_levels_and_spacing(self, pair_files, tmp_path, capsys):
        code, _, stderr = run(register_args(pair_files, tmp_path / "o") + ["--levels", "5"], capsys)
        assert code == 2 and "use --levels 4 or less, or a finer --spacing" in error_line(stderr)

    def test_out_dir_parent_is_a_file(self, pair_files, tmp_path, capsys):
        (tmp_path / "file").write_text("x")
        code, _, stderr = run(register_args(pair_files, tmp_path / "file" / "out"), capsys)
        assert code == 2
        assert "its parent" in error_line(stderr) and "is a file, not a folder" in stderr

    def test_out_dir_with_other_files_is_not_replaced(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        code, _, stderr = run(register_args(pair_files, out), capsys)
        assert code == 2 and "holds files voxelopt did not write (notes.txt)" in error_line(stderr)
        assert contents(out) == {"notes.txt": "mine"}

    def test_out_dir_without_write_permission(self, pair_files, tmp_path, capsys, monkeypatch):
        """Checked before anything is computed (as root, os.access is simulated)."""
        from voxelopt import outputs
        from voxelopt.cli import register as cli

        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        if os.access(locked, os.W_OK):  # root writes anyway: simulate what others would see
            real = os.access
            monkeypatch.setattr(
                outputs.os, "access", lambda p, m: False if p == locked else real(p, m)
            )
        monkeypatch.setattr(cli, "load_volume", lambda *a: pytest.fail("loaded before the check"))
        try:
            code, _, stderr = run(register_args(pair_files, locked / "out"), capsys)
        finally:
            locked.chmod(0o755)
        assert code == 2 and f"no permission to write in {locked}" in error_line(stderr)

    def test_not_enough_memory_is_found_before_loading(
        self, pair_files, tmp_path, capsys, monkeypatch
    ):
        from voxelopt import memory
        from voxelopt.cli import register as cli

        monkeypatch.setattr(memory, "available_memory_bytes", lambda: 50_000_000)
        monkeypatch.setattr(cli, "load_volume", lambda *a: pytest.fail("loaded before the check"))
        code, _, stderr = run(register_args(pair_files, tmp_path / "out"), capsys)
        line = error_line(stderr)
        assert code == 2 and "registration needs about" in line and "0.1 GB is available" in line
        assert not (tmp_path / "out").exists() and hidden(tmp_path) == []

    @pytest.mark.parametrize(
        "exc, fragment",
        [
            (MemoryError(), "out of memory: use a coarser --spacing"),
            (RuntimeError("boom\nmore lines"), "internal error (RuntimeError: boom)"),
            (OSError(28, "No space left on device"), "No space left on device"),
        ],
        ids=["memory", "internal", "disk-full"],
    )
    def test_unexpected_failures_are_one_line(
        self, pair_files, tmp_path, capsys, monkeypatch, exc, fragment
    ):
        from voxelopt.cli import register as cli

        out = tmp_path / "out"
        before = previous_run(out)

        def fail(*args, **kwargs):
            raise exc

        monkeypatch.setattr(cli, "register_volumes", fail)
        code, _, stderr = run(register_args(pair_files, out), capsys)
        assert code == 2 and fragment in error_line(stderr)
        assert contents(out) == before and hidden(tmp_path) == []

    @pytest.mark.parametrize(
        "extra, fragment",
        [
            (["--levels", "x"], "argument --levels: invalid positive integer value: 'x'"),
            (["--levels", "0"], "argument --levels: must be an integer >= 1, got 0"),
            (["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
            (["--spacing", "abc"], "argument --spacing: must be 'auto' or millimetres > 0"),
            (["--spacing", "-2"], "argument --spacing: must be 'auto' or millimetres > 0"),
            (["--features", "sift"], "argument --features: unknown feature extractor 'sift'"),
        ],
    )
    def test_argument_errors(self, pair_files, tmp_path, capsys, extra, fragment):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in register_args(pair_files, out) + extra])
        assert exc.value.code == 2
        line = error_line(capsys.readouterr().err)
        assert fragment in line and "_positive_int" not in line and "usage:" not in line
        assert not out.exists()

    def test_missing_required_argument(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["register", "--fixed", "f.nii.gz"])
        assert exc.value.code == 2
        assert "the following arguments are required" in error_line(capsys.readouterr().err)


class TestWarnings:
    def test_half_precision_on_cpu_and_too_fine_spacing(self, pair_files, tmp_path, capsys):
        args = register_args(pair_files, tmp_path / "out", labels=False)
        args += ["--precision", "float16", "--spacing", "1", "--levels", "2"]
        code, _, stderr = run(args, capsys)
        assert code == 0
        lines = stderr.splitlines()
        assert all(line.startswith("voxelopt: warning: ") for line in lines) and len(lines) == 2
        assert "--precision float16 on CPU is about 3x slower than float32" in lines[0]
        assert "--spacing 1 is finer than the fixed image (4.00 mm): its own spacing" in lines[1]
        report = strict_json(tmp_path / "out" / "report.json")
        assert report["grids"]["working"]["spacing_mm"] == pytest.approx([4.0, 4.0, 4.0])


def _child(args, out_parent):
    """``voxelopt`` in a child process, with SIGINT at its default even when this process was
    started with it ignored (a background job)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "voxelopt.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(moment, parent, child, timeout_s=120.0):
    """Poll until the run has made its staging folder ("start") or written into it
    ("writing")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        staging = [p for p in parent.iterdir() if ".voxelopt-staging-" in p.name]
        if staging and (moment == "start" or any(staging[0].iterdir())):
            return
        assert child.poll() is None, f"finished before {moment}: {child.communicate()}"
        time.sleep(0.002)
    pytest.fail(f"no {moment} within {timeout_s} s")


@pytest.mark.parametrize(
    "signum, moment, existing",
    [
        (signal.SIGINT, "start", False),
        (signal.SIGTERM, "start", True),
        (signal.SIGINT, "writing", True),
        (signal.SIGTERM, "writing", False),
    ],
    ids=["int-start-new", "term-start-existing", "int-writing-existing", "term-writing-new"],
)
def test_signal_leaves_out_as_it_was(pair_files, tmp_path, signum, moment, existing):
    out = tmp_path / "out"
    before = previous_run(out) if existing else None
    child = _child(register_args(pair_files, out, labels=False), tmp_path)
    try:
        _wait_for(moment, tmp_path, child)
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum
    name = signal.Signals(signum).name
    state = "left as it was" if existing else "not created"
    assert stderr.splitlines() == [f"voxelopt: interrupted by {name}; {out} {state}"]
    assert contents(out) == before
    assert hidden(tmp_path) == []  # the staging folder is gone


def test_interruption_in_process_is_one_line(pair_files, tmp_path, capsys, monkeypatch):
    from voxelopt.cli import register as cli
    from voxelopt.outputs import Interrupted

    out = tmp_path / "out"
    before = previous_run(out)

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(cli, "register_volumes", interrupted)
    code, _, stderr = run(register_args(pair_files, out), capsys)
    assert code == 130
    assert stderr.splitlines() == [f"voxelopt: interrupted by SIGINT; {out} left as it was"]
    assert contents(out) == before and hidden(tmp_path) == []


def test_demo_from_a_ct_without_labels(pair_files, tmp_path, capsys):
    """No --ct-labels: no label files, no Dice (instead of all-zero maps and 'nan %')."""
    out = tmp_path / "demo"
    args = ["demo", "--ct", pair_files["fixed"], "--out-dir", out, "--levels", "3"]
    code, _, stderr = run(args + ["--features", "raw"], capsys)
    assert code == 0
    assert "demo pair made (no labels)" in stderr and "nan" not in stderr
    assert {p.name for p in (out / "inputs").iterdir()} == {"fixed.nii.gz", "moving.nii.gz"}
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"inputs"}
    assert strict_json(out / "report.json")["inputs"]["fixed_labels"] is None


# --- start-up and exit ------------------------------------------------------------------------


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_parser_and_help_import_nothing_heavy():
    code = (
        "import sys; from voxelopt.cli import build_parser; build_parser()\n"
        "sys.argv = ['voxelopt', '--help']\n"
        "try:\n    build_parser().parse_args()\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'nibabel', 'numpy', 'scipy', 'numba')\n"
        "print(' '.join(m for m in heavy if m in sys.modules), file=sys.stderr)"
    )
    done = _python(code)
    assert done.returncode == 0 and "register-batch" in done.stdout
    assert done.stderr.strip() == ""


def test_help_texts_copies_match_their_sources():
    from voxelopt.cli.parser import FEATURE_NAMES, VOXEL_BUDGET
    from voxelopt.features import available_extractors
    from voxelopt.grid import DEFAULT_VOXEL_BUDGET

    assert list(FEATURE_NAMES) == available_extractors()
    assert VOXEL_BUDGET == DEFAULT_VOXEL_BUDGET


@pytest.mark.parametrize(
    "argv, code, stream, text",
    [
        (["--help"], 0, "stdout", "usage: voxelopt"),
        (["register", "--levels", "x"], 2, "stderr", "voxelopt: error: argument --levels"),
    ],
    ids=["help", "argument-error"],
)
def test_console_exits_directly_after_flushing(argv, code, stream, text):
    """The console path leaves through os._exit (atexit handlers do not run) and flushes
    stdout and stderr first (they are pipes here, so block-buffered)."""
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('teardown ran', file=sys.stderr))\n"
        "from voxelopt.cli import console\n"
        "sys.argv = ['voxelopt', *sys.argv[1:]]\n"
        "console()\n"
    )
    done = _python(script, *argv)
    assert done.returncode == code
    assert text in getattr(done, stream) and "teardown ran" not in done.stderr


def test_main_called_from_python_returns(monkeypatch, capsys):
    """Without argv, main() reads sys.argv but never ends the calling process."""
    monkeypatch.setattr(sys, "argv", ["voxelopt", "--help"])
    with pytest.raises(SystemExit) as exc:  # argparse's own exit, catchable
        main()
    assert exc.value.code == 0 and "register-batch" in capsys.readouterr().out


def test_whole_process_writes_everything_before_leaving(pair_files, tmp_path):
    out = tmp_path / "out"
    args = [str(a) for a in register_args(pair_files, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "voxelopt.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("runtime ") and done.stdout.endswith("\n")
    report = strict_json(out / "report.json")
    files = {p.name for p in out.iterdir()}
    assert report["complete"] and {*report["files"], "report.json"} == files
    assert report["stages_s"]["import"] > 0  # torch and the command's modules


def test_displacement_on_the_working_grid_and_vector_intent(pair_files, tmp_path, capsys):
    """--displacement-grid working writes the solver's grid with its own affine; both
    layouts carry the NIfTI vector intent."""
    full, coarse = tmp_path / "full", tmp_path / "coarse"
    assert run(register_args(pair_files, full), capsys)[0] == 0
    args = register_args(pair_files, coarse) + ["--spacing", "8", "--displacement-grid", "working"]
    assert run(args, capsys)[0] == 0
    a, b = nib.load(full / "displacement.nii.gz"), nib.load(coarse / "displacement.nii.gz")
    assert a.shape == (*nib.load(pair_files["fixed"]).shape, 3)
    assert b.shape[3] == 3 and all(n < m for n, m in zip(b.shape[:3], a.shape[:3], strict=True))
    assert a.header.get_intent()[0] == b.header.get_intent()[0] == "vector"
    report = json.loads((coarse / "report.json").read_text())
    assert report["displacement_grid"] == "working"
