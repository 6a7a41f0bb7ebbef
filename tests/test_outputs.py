"""Staging folder and swap, signal guard, strict JSON report (voxelopt.outputs)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from voxelopt import outputs
from voxelopt.outputs import (
    Interrupted,
    SignalGuard,
    StagedOutput,
    json_safe,
    write_report,
)


def strict_load(path):
    """json.loads that refuses NaN and Infinity (as a strict JSON parser does)."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def previous_run(out):
    """A complete earlier run in ``out``: three files and its report."""
    out.mkdir()
    for name in ("moved.nii.gz", "moved_labels.nii.gz", "registration.png"):
        (out / name).write_text(f"old {name}")
    files = ["moved.nii.gz", "moved_labels.nii.gz", "registration.png"]
    (out / "report.json").write_text(json.dumps({"complete": True, "files": files}))
    return {p.name: p.read_text() for p in out.iterdir()}


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM at their defaults (a shell may start tests with SIGINT ignored)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


class TestStagedOutput:
    def test_commit_creates_out_with_exactly_the_run_files(self, tmp_path):
        out_dir = tmp_path / "out"
        with StagedOutput(out_dir) as out:
            assert out.staging.parent == tmp_path and out.staging.name.startswith(".out.")
            assert not out_dir.exists()
            out.path("moved.nii.gz").write_text("new")
            out.path("inputs").mkdir()
            out.path("inputs/fixed.nii.gz").write_text("f")
            files = out.commit({"runtime_s": 1.5})
        assert files == ["inputs/fixed.nii.gz", "moved.nii.gz", "report.json"]
        report = strict_load(out_dir / "report.json")
        assert report["complete"] is True and report["runtime_s"] == 1.5
        assert report["files"] == ["inputs/fixed.nii.gz", "moved.nii.gz"]
        names = sorted(p.name for p in out_dir.iterdir())
        assert names == ["inputs", "moved.nii.gz", "report.json"]
        assert hidden(tmp_path) == []

    def test_replaces_an_earlier_run_as_a_whole(self, tmp_path):
        out_dir = tmp_path / "out"
        previous_run(out_dir)
        with StagedOutput(out_dir) as out:
            out.path("moved.nii.gz").write_text("new")
            out.commit({})
        assert sorted(p.name for p in out_dir.iterdir()) == ["moved.nii.gz", "report.json"]
        assert (out_dir / "moved.nii.gz").read_text() == "new"
        assert hidden(tmp_path) == []

    def test_error_leaves_out_as_it_was(self, tmp_path):
        out_dir = tmp_path / "out"
        before = previous_run(out_dir)
        with pytest.raises(RuntimeError), StagedOutput(out_dir) as out:
            out.path("moved.nii.gz").write_text("half")
            raise RuntimeError("failed while writing")
        assert {p.name: p.read_text() for p in out_dir.iterdir()} == before
        assert hidden(tmp_path) == []

    def test_failed_swap_is_rolled_back(self, tmp_path, monkeypatch):
        out_dir = tmp_path / "out"
        before = previous_run(out_dir)
        real_rename, calls = os.rename, []

        def rename(src, dst):
            calls.append(src)
            if len(calls) == 2:  # staging -> OUT, after OUT was moved away
                raise OSError(28, "No space left on device")
            real_rename(src, dst)

        with StagedOutput(out_dir) as out:
            out.path("moved.nii.gz").write_text("new")
            monkeypatch.setattr(outputs.os, "rename", rename)
            with pytest.raises(OSError, match="No space"):
                out.commit({})
        assert {p.name: p.read_text() for p in out_dir.iterdir()} == before
        assert hidden(tmp_path) == []

    def test_refuses_a_folder_with_other_files(self, tmp_path):
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        (out_dir / "thesis.tex").write_text("mine")
        with pytest.raises(ValueError, match=r"holds files voxelopt did not write \(thesis.tex\)"):
            StagedOutput(out_dir)
        assert (out_dir / "thesis.tex").read_text() == "mine" and hidden(tmp_path) == []

    def test_files_listed_by_an_earlier_report_are_ours(self, tmp_path):
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        (out_dir / "extra.csv").write_text("x")
        (out_dir / "report.json").write_text(json.dumps({"files": ["extra.csv"]}))
        StagedOutput(out_dir).discard()

    @pytest.mark.parametrize(
        "layout, error, match",
        [
            ("parent_is_file", ValueError, "is a file, not a folder"),
            ("parent_missing", FileNotFoundError, "does not exist"),
            ("out_is_file", ValueError, "exists and is not a folder"),
            ("out_is_link", ValueError, "is a symbolic link: give the folder itself"),
            ("root", ValueError, "the root folder cannot be an output folder"),
        ],
    )
    def test_unusable_out_dir(self, tmp_path, layout, error, match):
        (tmp_path / "file").write_text("x")
        (tmp_path / "folder").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "folder")
        out_dir = {
            "parent_is_file": tmp_path / "file" / "out",
            "parent_missing": tmp_path / "missing" / "out",
            "out_is_file": tmp_path / "file",
            "out_is_link": tmp_path / "link",
            "root": outputs.Path("/"),
        }[layout]
        with pytest.raises(error, match=match):
            StagedOutput(out_dir, option="--out-dir")

    def test_no_write_permission_real(self, tmp_path):
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
        try:
            if os.access(parent, os.W_OK):
                pytest.skip("this user (root) can write into a read-only folder")
            with pytest.raises(PermissionError, match="no permission to write"):
                StagedOutput(parent / "out")
        finally:
            parent.chmod(0o755)

    def test_no_write_permission_reported(self, tmp_path, monkeypatch):
        monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
        with pytest.raises(PermissionError, match=f"no permission to write in {tmp_path}"):
            StagedOutput(tmp_path / "out")

    def test_read_only_file_system(self, tmp_path, monkeypatch):
        def mkdir(self, *args, **kwargs):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(outputs.Path, "mkdir", mkdir)
        with pytest.raises(PermissionError, match="cannot create a folder .*Read-only"):
            StagedOutput(tmp_path / "out")

    def test_stale_folders_of_killed_runs_are_removed(self, tmp_path):
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        dead_pid = int(dead.stdout)
        stale = tmp_path / f".out.voxelopt-staging-{dead_pid}-0123abcd"
        live = tmp_path / f".out.voxelopt-staging-{os.getppid()}-0123abcd"
        other = tmp_path / f".other.voxelopt-staging-{dead_pid}-0123abcd"
        for folder in (stale, live, other):
            folder.mkdir()
        StagedOutput(tmp_path / "out").discard()
        assert not stale.exists() and live.exists() and other.exists()


class TestSignalGuard:
    @pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
    def test_signal_raises_interrupted(self, default_signals, signum, code):
        with SignalGuard(), pytest.raises(Interrupted) as exc:
            signal.raise_signal(signum)
            for _ in range(1000):  # the handler runs at the next bytecode
                pass
        assert exc.value.exit_code == code and exc.value.name == signal.Signals(signum).name
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    def test_held_back_in_a_critical_section(self, default_signals):
        done = []
        with SignalGuard() as guard, pytest.raises(Interrupted):
            with guard.critical():
                signal.raise_signal(signal.SIGTERM)
                done.append("swap")
        assert done == ["swap"]

    def test_ignored_once_finished_and_when_repeated(self, default_signals):
        with SignalGuard() as guard:
            with guard.critical():
                signal.raise_signal(signal.SIGINT)
                guard.finish()
            signal.raise_signal(signal.SIGINT)  # after the run is complete: ignored
        with SignalGuard() as guard, pytest.raises(Interrupted):
            try:
                signal.raise_signal(signal.SIGINT)
            finally:
                signal.raise_signal(signal.SIGINT)  # while cleaning up: ignored

    def test_keeps_an_inherited_ignore(self, default_signals):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with SignalGuard():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)

    def test_signal_during_the_swap_completes_the_run(self, tmp_path, default_signals, monkeypatch):
        out_dir = tmp_path / "out"
        previous_run(out_dir)
        real_rename = os.rename

        def rename(src, dst):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between the two renames
            real_rename(src, dst)

        with SignalGuard() as guard, StagedOutput(out_dir, guard) as out:
            out.path("moved.nii.gz").write_text("new")
            monkeypatch.setattr(outputs.os, "rename", rename)
            out.commit({})
        assert sorted(p.name for p in out_dir.iterdir()) == ["moved.nii.gz", "report.json"]
        assert strict_load(out_dir / "report.json")["complete"] is True
        assert hidden(tmp_path) == []


class TestStrictJson:
    def test_json_safe(self):
        report = {
            "metrics": {"hd95": float("nan"), "dice": np.float32(0.5), "n": np.int64(3)},
            "values": np.array([1.0, np.inf]),
            "path": outputs.Path("/a/b"),
            "ok": np.bool_(True),
        }
        clean, undefined = json_safe(report, lambda path: "why " + ".".join(path))
        assert clean == {
            "metrics": {"hd95": None, "dice": 0.5, "n": 3},
            "values": [1.0, None],
            "path": "/a/b",
            "ok": True,
        }
        assert undefined == {"metrics.hd95": "why metrics.hd95", "values.1": "why values.1"}
        json.dumps(clean, allow_nan=False)

    def test_default_reasons(self):
        _, undefined = json_safe({"a": -math.inf, "b": math.nan})
        assert undefined == {"a": "Infinity", "b": "NaN"}

    def test_write_report_is_strict_json(self, tmp_path):
        path = write_report(tmp_path / "r.json", {"metrics": {"dice": math.nan}, "x": 1})
        report = strict_load(path)
        assert report["metrics"]["dice"] is None and report["x"] == 1
        assert report["undefined"] == {"metrics.dice": "NaN"}
