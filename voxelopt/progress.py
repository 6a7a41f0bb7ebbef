"""Stage progress of a command-line run: a line when each stage starts and ends, tqdm bars.

Every stage (loading, resampling, features, each pyramid level, metrics, writing) prints a
line on stderr when it starts and one when it ends, both stamped with the seconds since the
run started, the end line also with the stage's own duration. A stage that runs longer than
``bar_delay_s`` seconds shows a `tqdm <https://tqdm.github.io>`_ bar (elapsed time, and the
steps done when the stage has steps, e.g. pyramid levels) that is cleared when it ends. Bars
are shown only on a terminal; the lines always (unless ``quiet``).

A :class:`Progress` is also the ``progress(stage, event, info)`` callback of
:func:`voxelopt.pipeline.register_volumes`: its stages appear with the same lines and bars.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> progress = Progress(stream=stream, clock=iter(range(100)).__next__)
    >>> with progress.stage("loading", "fixed.nii.gz"):
    ...     pass
    >>> print(stream.getvalue(), end="")
    [   1.0 s] loading: fixed.nii.gz
    [   2.0 s] loading done in 1.0 s
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

__all__ = ["STAGE_NAMES", "Progress", "Stage"]

#: How the stages of :func:`voxelopt.pipeline.register_volumes` are named in the lines.
STAGE_NAMES = {"resample": "resampling", "solve": "solving", "warp": "warping"}


class Stage:
    """A running stage: its steps (e.g. pyramid levels), its bar, its end.

    Attributes:
        name: the stage's name, e.g. ``"solving"``.
        total: number of steps, or ``None`` for a stage without steps.
        done: steps reported so far.
        start: when it started (seconds since the run started).
    """

    def __init__(self, progress: Progress, name: str, total: int | None, start: float) -> None:
        self.progress, self.name, self.total, self.done, self.start = (
            progress,
            name,
            total,
            0,
            start,
        )
        self._last = start
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _show_bar(self, delay_s: float) -> None:
        self._bar = tqdm(
            total=self.total,
            desc=self.name,
            unit="step",
            file=self.progress.stream,
            delay=delay_s,
            leave=False,
            # no rate or ETA: pyramid levels differ 8-fold in cost, so neither would be true
            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}"
            if self.total
            else "{desc}: {elapsed}",
            dynamic_ncols=True,
        )
        # tqdm redraws only when updated: keep the elapsed time moving between steps
        self._ticker = threading.Thread(target=_tick, args=(self._bar, self._stop), daemon=True)
        self._ticker.start()

    def step(self, message: str | None = None) -> None:
        """One step is finished: the bar advances; ``message`` (if any) gets a line with the
        step's duration."""
        now = self.progress.elapsed()
        self.done += 1
        if message is not None:
            self.progress.line(f"{message} done in {now - self._last:.1f} s", now)
        self._last = now
        if self._bar is not None:
            self._bar.update(1)

    def on_level(self, done: int, levels: int) -> None:
        """The solver's ``on_level`` callback: ``done`` of ``levels`` pyramid levels are
        finished (coarsest first, so the one just finished is pyramid level
        ``levels - done``)."""
        self.step(f"level {done} of {levels} (pyramid level {levels - done})")

    def close(self, ok: bool = True) -> None:
        """Stop the bar; with ``ok``, record the duration and print the end line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()
        if self.progress._current is self:
            self.progress._current = None
        if ok:
            end = self.progress.elapsed()
            durations = self.progress.durations
            durations[self.name] = durations.get(self.name, 0.0) + end - self.start
            self.progress.line(f"{self.name} done in {end - self.start:.1f} s", end)


class Progress:
    """Stage lines and tqdm bars on a stream (stderr by default).

    Args:
        quiet: print nothing at all.
        stream: where lines and bars go (default ``sys.stderr`` at call time).
        bar_delay_s: a stage shows a bar once it has run this many seconds.
        bars: show bars; ``None`` (default) shows them only when ``stream`` is a terminal.
        clock: seconds as a float (default :func:`time.perf_counter`; tests pass a fake).
    """

    def __init__(
        self,
        quiet: bool = False,
        stream: TextIO | None = None,
        bar_delay_s: float = 3.0,
        bars: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if bar_delay_s < 0:
            raise ValueError(f"bar_delay_s must be >= 0, got {bar_delay_s}")
        self.quiet, self.bar_delay_s, self._clock = quiet, bar_delay_s, clock
        self._stream, self._bars = stream, bars
        self._current: Stage | None = None  # the running stage (its bar is redrawn by line())
        self._events: dict[str, Stage] = {}  # stages opened through the callback protocol
        self._start = clock()
        #: seconds each finished stage took, by name (repeated names add up)
        self.durations: dict[str, float] = {}

    @property
    def stream(self) -> TextIO:
        """The stream lines and bars are written to."""
        return self._stream if self._stream is not None else sys.stderr

    def elapsed(self) -> float:
        """Seconds since this object was made (the run's start)."""
        return self._clock() - self._start

    def line(self, text: str, at: float | None = None) -> None:
        """Print ``[  12.3 s] text`` (seconds since the start) unless quiet."""
        if self.quiet:
            return
        at = self.elapsed() if at is None else at
        text = f"[{at:6.1f} s] {text}\n"
        bar = self._current._bar if self._current is not None else None
        if bar is not None and time.time() - bar.start_t >= bar.delay:  # the bar is on screen
            with bar.get_lock():
                bar.clear(nolock=True)
                self.stream.write(text)
                bar.refresh(nolock=True)
        else:
            self.stream.write(text)
        self.stream.flush()

    def _show_bars(self) -> bool:
        if self.quiet:
            return False
        if self._bars is not None:
            return self._bars
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def begin(self, name: str, detail: str = "", total: int | None = None) -> Stage:
        """Start a stage (its line, its bar); end it with :meth:`Stage.close`."""
        start = self.elapsed()
        self.line(f"{name}: {detail}" if detail else name, start)
        stage = Stage(self, name, total, start)
        if self._show_bars():
            stage._show_bar(self.bar_delay_s)
        self._current = stage
        return stage

    @contextmanager
    def stage(self, name: str, detail: str = "", total: int | None = None) -> Iterator[Stage]:
        """A stage: its start line, a bar while it runs (after ``bar_delay_s``), its end line.

        The end line is printed only when the stage finishes without an exception.

        Args:
            name: short name, e.g. ``"features"``.
            detail: what it works on, printed on the start line.
            total: number of steps (:meth:`Stage.step`), e.g. pyramid levels; ``None`` for a
                stage without steps (its bar shows the elapsed time).

        Yields:
            The :class:`Stage`.
        """
        stage = self.begin(name, detail, total)
        try:
            yield stage
        except BaseException:
            stage.close(ok=False)
            raise
        stage.close()

    def __call__(self, stage: str, event: str, info: dict) -> None:
        """The ``progress(stage, event, info)`` callback of :mod:`voxelopt.pipeline`.

        ``"start"`` begins a stage (``info`` describes it: ``shape``, ``spacing_mm``,
        ``extractor``, ``grid``, ``total``), ``"step"`` advances it (a line for pyramid
        levels: ``info["level"]``), ``"end"`` ends it.
        """
        if event == "start":
            self._events[stage] = self.begin(
                STAGE_NAMES.get(stage, stage), _describe(info), info.get("total")
            )
        elif event == "step" and stage in self._events:
            running = self._events[stage]
            if "level" in info:  # a pyramid level: "done" of "total" finished
                running.on_level(int(info["done"]), int(info["total"]))
            else:
                running.step()
        elif event == "end" and stage in self._events:
            self._events.pop(stage).close()

    @contextmanager
    def events(self) -> Iterator[Progress]:
        """Around a call that reports through :meth:`__call__`: stages it left open (it
        raised) are closed without an end line."""
        try:
            yield self
        finally:
            while self._events:
                self._events.popitem()[1].close(ok=False)


def _describe(info: dict) -> str:
    """``96x80x128 voxels, 4.00 x 4.00 x 4.00 mm, MindSSC, working grid`` from a stage's info."""
    parts = []
    if "shape" in info:
        parts.append("x".join(str(int(s)) for s in info["shape"]) + " voxels")
    if "spacing_mm" in info:
        parts.append(" x ".join(f"{float(s):.2f}" for s in info["spacing_mm"]) + " mm")
    if "extractor" in info:
        parts.append(str(info["extractor"]))
    if "grid" in info:
        parts.append(f"{info['grid']} grid")
    return ", ".join(parts)


def _tick(bar: tqdm, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Redraw ``bar`` every ``interval_s`` until ``stop`` is set (tqdm honours its delay)."""
    while not stop.wait(interval_s):
        bar.update(0)
