"""One complete set of outputs per run: a staging folder swapped in at the end, and signals.

:class:`StagedOutput` writes a run's files into a hidden staging folder beside ``OUT`` (same
parent, so renames stay on one file system) and, once everything is written, writes
``report.json`` last (``"complete": true`` and the list of files it belongs with) and swaps the
staging folder in: ``OUT`` is renamed away, the staging folder renamed to ``OUT`` and the old
folder deleted. ``OUT`` therefore always holds the files of exactly one run, or what it held
before, or (for a moment during the swap, or after an interruption then) nothing.

:class:`SignalGuard` turns SIGINT and SIGTERM into an :class:`Interrupted` exception, so the
staging folder is removed on the way out; during the swap a signal is held back until the
swap is done, and one arriving after it is ignored (the run is complete by then).

``report.json`` is strict JSON: :func:`json_safe` turns NaN and infinities into ``null`` and
collects the reason for each under ``"undefined"``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "KNOWN_OUTPUTS",
    "REPORT_NAME",
    "Interrupted",
    "SignalGuard",
    "StagedOutput",
    "json_safe",
    "write_report",
]

REPORT_NAME = "report.json"

#: Names voxelopt writes into OUT (any version); an existing OUT holding anything else is not
#: replaced, so that a mistyped --out-dir never deletes a user's own files.
KNOWN_OUTPUTS = frozenset(
    {
        "moved.nii.gz",
        "moved_labels.nii.gz",
        "displacement.nii.gz",
        "displacement_working_grid.nii.gz",
        "registration.png",
        REPORT_NAME,
        "inputs",
    }
)

_STAGING = re.compile(r"^\.(?P<name>.+)\.voxelopt-(?P<kind>staging|old)-(?P<pid>\d+)-[0-9a-f]+$")


class Interrupted(BaseException):
    """Raised in the main thread by :class:`SignalGuard` when SIGINT or SIGTERM arrives.

    A ``BaseException`` (like ``KeyboardInterrupt``), so ``except Exception`` does not swallow
    it. ``exit_code`` is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {self.name}")


class SignalGuard:
    """SIGINT and SIGTERM raise :class:`Interrupted` (first one only), except in a critical
    section (held back until it ends) and after :meth:`finish` (ignored).

    Use as a context manager around a run; the previous handlers are restored on exit. A
    signal the process was started with ignored (``nohup``, ``cmd &`` in a script) stays
    ignored. Must be entered in the main thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.finished = False
        self._critical = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        for signum in self.SIGNALS:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # ignored by whoever started us (nohup, a background job): keep it so
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None or self.finished:
            return  # a repeated signal while cleaning up, or the run is already complete
        self.received = signum
        if not self._critical:
            raise Interrupted(signum)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """Hold signals back inside; raise :class:`Interrupted` at the end unless finished."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self.received is not None and not self.finished:
            raise Interrupted(self.received)

    def finish(self) -> None:
        """The run is complete: later signals are ignored."""
        self.finished = True


class StagedOutput:
    """A hidden staging folder beside ``out_dir``, swapped in by :meth:`commit`.

    Creating it checks that ``out_dir`` can be written (its parent exists, is a folder and
    is writable: the staging folder is made there) and that an existing ``out_dir`` holds
    only voxelopt outputs. Leaving the ``with`` block without :meth:`commit` (an error, an
    :class:`Interrupted`) deletes the staging folder and leaves ``out_dir`` untouched.

    Args:
        out_dir: the output folder ``OUT``.
        guard: the run's :class:`SignalGuard`; the swap is a critical section of it.
        option: how to name ``out_dir`` in error messages.

    Raises:
        ValueError: ``out_dir`` or its parent is not a folder, or ``out_dir`` holds files
            voxelopt did not write.
        FileNotFoundError: the parent folder does not exist.
        PermissionError: the parent folder cannot be written.
    """

    def __init__(
        self, out_dir: str | Path, guard: SignalGuard | None = None, option: str = "--out-dir"
    ) -> None:
        self.out_dir = Path(os.path.abspath(out_dir))
        self.guard, self.option = guard, option
        self.committed = False
        _check_out_dir(self.out_dir, option)
        _remove_stale(self.out_dir)
        self.staging = self._sibling("staging")
        try:
            self.staging.mkdir()
        except OSError as exc:
            raise PermissionError(
                f"{option} {out_dir}: cannot create a folder in {self.out_dir.parent} "
                f"({exc.strerror or exc})"
            ) from None

    def _sibling(self, kind: str) -> Path:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return self.out_dir.with_name(f".{self.out_dir.name}.voxelopt-{kind}-{tag}")

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.discard()

    def path(self, name: str) -> Path:
        """Where to write the output ``name`` (a path inside the staging folder)."""
        return self.staging / name

    def final_path(self, name: str) -> Path:
        """Where the output ``name`` will be once committed (inside ``out_dir``)."""
        return self.out_dir / name

    def files(self) -> list[str]:
        """Every file in the staging folder, relative, sorted (POSIX separators)."""
        return sorted(
            p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file()
        )

    def discard(self) -> None:
        """Delete the staging folder (nothing is committed)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self, report: dict, reason: Callable[[tuple], str] | None = None) -> list[str]:
        """Write ``report.json`` last and swap the staging folder in as ``out_dir``.

        The report gets ``"complete": true``, ``"files"`` (every other file of the run,
        relative to ``out_dir``) and ``"undefined"`` (see :func:`write_report`). Signals
        arriving during the swap are held back until it is done, then ignored.

        Args:
            report: JSON-able dict (NaN and infinities become ``null``).
            reason: why a non-finite value at a key path is undefined (see :func:`json_safe`).

        Returns:
            The files now in ``out_dir`` (relative paths, ``report.json`` last).
        """
        files = self.files()
        write_report(self.path(REPORT_NAME), {**report, "complete": True, "files": files}, reason)
        critical = self.guard.critical() if self.guard is not None else _nothing()
        with critical:
            old = self._swap()
            self.committed = True
            if self.guard is not None:
                self.guard.finish()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return [*files, REPORT_NAME]

    def _swap(self) -> Path | None:
        """Rename ``out_dir`` away and the staging folder onto it; the old folder's path."""
        old = None
        if self.out_dir.exists():
            _check_out_dir(self.out_dir, self.option)  # still ours to replace?
            old = self._sibling("old")
            os.rename(self.out_dir, old)
        try:
            os.rename(self.staging, self.out_dir)
        except OSError:
            if old is not None:
                os.rename(old, self.out_dir)
            raise
        return old


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _check_out_dir(out_dir: Path, option: str) -> None:
    """Raise unless ``out_dir`` can be (re)placed: parent a writable folder, ours to replace."""
    parent = out_dir.parent
    if not parent.exists():
        raise FileNotFoundError(f"{option} {out_dir}: its parent folder {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{option} {out_dir}: its parent {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {out_dir}: no permission to write in {parent}")
    if not out_dir.name or out_dir == parent:
        raise ValueError(f"{option} {out_dir}: the root folder cannot be an output folder")
    if out_dir.is_symlink():
        raise ValueError(f"{option} {out_dir} is a symbolic link: give the folder itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{option} {out_dir} exists and is not a folder")
    if out_dir.is_dir():
        foreign = sorted(set(os.listdir(out_dir)) - _ours(out_dir))
        if foreign:
            raise ValueError(
                f"{option} {out_dir} holds files voxelopt did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); it would be replaced as a whole: "
                "give a new or empty folder"
            )


def _ours(out_dir: Path) -> set[str]:
    """Top-level names of ``out_dir`` that a voxelopt run wrote (known names, its report's)."""
    names = set(KNOWN_OUTPUTS)
    try:
        listed = json.loads((out_dir / REPORT_NAME).read_text()).get("files", [])
        names.update(str(f).split("/")[0] for f in listed)
    except (OSError, ValueError, AttributeError):
        pass
    return names


def _remove_stale(out_dir: Path) -> None:
    """Delete staging and old folders of ``out_dir`` left by runs that were killed (SIGKILL)."""
    for entry in out_dir.parent.glob(f".{glob_escape(out_dir.name)}.voxelopt-*"):
        match = _STAGING.match(entry.name)
        if match and match["name"] == out_dir.name and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- strict JSON ---------------------------------------------------------------------------


def json_safe(obj, reason: Callable[[tuple], str] | None = None, _path: tuple = ()):
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    NaN and infinities become ``None``; numpy scalars and arrays and tuples become Python
    numbers and lists; paths become strings.

    Args:
        obj: nested dicts, lists, numbers, strings.
        reason: ``reason(path)`` says why the value at key path ``path`` (a tuple of keys) is
            not defined; default: ``"NaN"`` or ``"Infinity"``.

    Returns:
        ``(clean, undefined)``: the cleaned object and ``{"a.b.c": reason}`` for every value
        that became ``None``.
    """
    undefined: dict[str, str] = {}
    clean = _clean(obj, reason, _path, undefined)
    return clean, undefined


def _clean(obj, reason, path: tuple, undefined: dict):
    if isinstance(obj, dict):
        return {str(k): _clean(v, reason, (*path, str(k)), undefined) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        items = obj.tolist() if isinstance(obj, np.ndarray) else obj
        return [_clean(v, reason, (*path, str(i)), undefined) for i, v in enumerate(items)]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if math.isfinite(value):
            return value
        default = "NaN" if math.isnan(value) else "Infinity"
        undefined[".".join(path)] = (reason(path) if reason else None) or default
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_report(path: str | Path, report: dict, reason: Callable[[tuple], str] | None = None):
    """Write ``report`` as strict JSON (no NaN, no Infinity) to ``path``.

    Non-finite numbers become ``null``; ``report["undefined"]`` maps each of their key paths
    (dotted) to the reason (``reason(path)``, default ``"NaN"`` or ``"Infinity"``).

    Returns:
        The path written.
    """
    clean, undefined = json_safe(report, reason)
    clean["undefined"] = {**clean.get("undefined", {}), **undefined}
    path = Path(path)
    path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return path
