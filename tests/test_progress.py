"""Stage progress lines and tqdm bars (voxelopt.progress)."""

from __future__ import annotations

import io
import time

import pytest

from voxelopt.progress import Progress


def fake_clock(step: float = 0.5):
    """A clock that advances ``step`` seconds per reading."""
    state = {"t": 100.0}

    def clock() -> float:
        state["t"] += step
        return state["t"]

    return clock


class TestLines:
    def test_start_and_end_with_elapsed_seconds(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, clock=fake_clock())
        with progress.stage("loading", "fixed.nii.gz, moving.nii.gz"):
            pass
        with progress.stage("features"):
            pass
        assert stream.getvalue().splitlines() == [
            "[   0.5 s] loading: fixed.nii.gz, moving.nii.gz",
            "[   1.0 s] loading done in 0.5 s",
            "[   1.5 s] features",
            "[   2.0 s] features done in 0.5 s",
        ]
        assert progress.durations == {"loading": 0.5, "features": 0.5}

    def test_levels_reported_by_the_solver_hook(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, clock=fake_clock(1.0))
        with progress.stage("solving", "3 levels", total=3) as stage:
            for done in (1, 2, 3):  # VoxelOpt.solve's on_level(levels finished, levels)
                stage.on_level(done, 3)
        lines = stream.getvalue().splitlines()
        assert lines[1:4] == [
            "[   2.0 s] level 1 of 3 (pyramid level 2) done in 1.0 s",
            "[   3.0 s] level 2 of 3 (pyramid level 1) done in 1.0 s",
            "[   4.0 s] level 3 of 3 (pyramid level 0) done in 1.0 s",
        ]
        assert lines[4] == "[   5.0 s] solving done in 4.0 s"
        assert stage.done == 3

    def test_quiet_prints_nothing(self):
        stream = io.StringIO()
        progress = Progress(quiet=True, stream=stream, bars=True, bar_delay_s=0)
        with progress.stage("solving", total=2) as stage:
            stage.step("level")
        progress.line("anything")
        assert stream.getvalue() == ""
        assert "solving" in progress.durations

    def test_no_end_line_when_the_stage_fails(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, clock=fake_clock())
        with pytest.raises(RuntimeError), progress.stage("writing"):
            raise RuntimeError("disk full")
        assert stream.getvalue().splitlines() == ["[   0.5 s] writing"]
        assert progress.durations == {}

    def test_bad_delay(self):
        with pytest.raises(ValueError, match="bar_delay_s"):
            Progress(bar_delay_s=-1)


class TestBars:
    def test_long_stage_shows_a_bar_with_steps(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, bars=True, bar_delay_s=0.0)
        with progress.stage("solving", total=2) as stage:
            stage.step("level 1")
            stage.step("level 2")
        text = stream.getvalue()
        assert "\rsolving: 0/2 |" in text  # tqdm draws in place, no rate or ETA
        assert "step/s" not in text and "<" not in text
        assert "solving done in" in text

    def test_stage_without_steps_shows_its_elapsed_time(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, bars=True, bar_delay_s=0.2)
        with progress.stage("features"):
            time.sleep(1.0)  # the ticker redraws every 0.5 s once the delay has passed
        assert "\rfeatures: 00:0" in stream.getvalue()

    def test_short_stage_shows_no_bar(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, bars=True, bar_delay_s=5.0)
        with progress.stage("loading", total=1) as stage:
            stage.step("file")
        assert "\r" not in stream.getvalue()

    def test_no_bars_when_not_a_terminal(self):
        stream = io.StringIO()  # isatty() is False
        progress = Progress(stream=stream, bar_delay_s=0.0)
        with progress.stage("solving", total=1) as stage:
            stage.step("level")
        assert "\r" not in stream.getvalue() and "solving done" in stream.getvalue()


class TestPipelineProtocol:
    def test_events_of_register_volumes(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, clock=fake_clock(1.0))
        info = {"shape": (96, 80, 128), "spacing_mm": (4.0, 4.0, 4.0), "total": 2}
        progress("resample", "start", info)
        progress("resample", "step", {"done": 1, "total": 2})  # bar only, no line
        progress("resample", "end", {"seconds": 1.0})
        progress("solve", "start", {"shape": (96, 80, 128), "total": 2})
        progress("solve", "step", {"done": 1, "total": 2, "level": 1})
        progress("solve", "step", {"done": 2, "total": 2, "level": 0})
        progress("solve", "end", {"seconds": 2.0})
        assert stream.getvalue().splitlines() == [
            "[   1.0 s] resampling: 96x80x128 voxels, 4.00 x 4.00 x 4.00 mm",
            "[   3.0 s] resampling done in 2.0 s",  # the step read the clock once (2.0 s)
            "[   4.0 s] solving: 96x80x128 voxels",
            "[   5.0 s] level 1 of 2 (pyramid level 1) done in 1.0 s",
            "[   6.0 s] level 2 of 2 (pyramid level 0) done in 1.0 s",
            "[   7.0 s] solving done in 3.0 s",
        ]
        assert set(progress.durations) == {"resampling", "solving"}

    def test_stage_left_open_by_an_error_is_closed_without_end_line(self):
        stream = io.StringIO()
        progress = Progress(stream=stream, bars=True, bar_delay_s=0.0)
        with pytest.raises(MemoryError), progress.events():
            progress("features", "start", {"extractor": "MindSSC"})
            raise MemoryError
        assert "features done" not in stream.getvalue()
        assert progress._events == {} and progress._current is None

    def test_levels_of_the_real_solver(self):
        import torch

        from voxelopt import VoxelOpt

        stream = io.StringIO()
        progress = Progress(stream=stream)
        fixed, moving = torch.rand(1, 2, 12, 12, 12), torch.rand(1, 2, 12, 12, 12)
        with progress.stage("solving", total=2) as stage:
            VoxelOpt(levels=2).solve(fixed, moving, on_level=stage.on_level)
        text = stream.getvalue()
        assert "level 1 of 2 (pyramid level 1) done" in text
        assert "level 2 of 2 (pyramid level 0) done" in text
        assert stage.done == 2
