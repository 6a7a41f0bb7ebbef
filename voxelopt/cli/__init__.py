"""Command line: ``voxelopt register`` (a pair of NIfTI files), ``voxelopt register-batch``
(many pairs in one process) and ``voxelopt demo``.

Errors: every error (a missing or unreadable file, a file that is not a checkpoint, an
``--out-dir`` that cannot be written, images that do not overlap, a CT given as labels, one
label map without the other, a working grid too small for ``--levels``, not enough memory, an
option out of range) ends with one line ``voxelopt: error: ...`` on stderr and exit code 2;
so does an unexpected failure (``VOXELOPT_DEBUG=1`` shows its traceback). Questionable but
usable input (half precision on CPU, a ``--spacing`` finer than the image) gives one line
``voxelopt: warning: ...`` and goes on. ``--downsample`` is gone: ``--spacing MM`` sets the
working grid's voxel size. ``register-batch`` goes on past a pair that fails (one line each)
and exits with 1 when any did (:mod:`voxelopt.cli.batch`).

Outputs: written into a hidden staging folder beside ``OUT`` and swapped in at the end
(:mod:`voxelopt.outputs`), so ``OUT`` holds exactly the files of one run; ``report.json`` is
written last and lists them. SIGINT (Ctrl-C) or SIGTERM at any moment: one line on stderr,
exit code 130 or 143, ``OUT`` as it was before (or absent), no traceback.

Progress: each stage prints a line when it starts and ends, on stderr (:mod:`voxelopt.progress`).

Start-up and exit: the parser (:mod:`voxelopt.cli.parser`) imports nothing heavy, so
``voxelopt --help`` answers without loading torch; a command imports its module
(:mod:`voxelopt.cli.register`, :mod:`voxelopt.cli.batch`) only when it runs, and those seconds
are ``stages_s["import"]`` in report.json. The console script leaves through ``os._exit``
once the outputs are committed and stdout and stderr are flushed: the interpreter's teardown
of torch would add about 0.6 s and has nothing left to save. :func:`main` called from Python
returns its exit code as usual.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from voxelopt.cli.parser import build_parser

__all__ = ["build_parser", "console", "main"]

#: command -> (module, run function); the module is imported when the command runs
COMMANDS = {
    "register": ("voxelopt.cli.register", "run_register"),
    "demo": ("voxelopt.cli.register", "run_demo"),
    "register-batch": ("voxelopt.cli.batch", "run_batch"),
}


@contextmanager
def _warnings_as_lines():
    """Python warnings printed as one line ``voxelopt: warning: ...`` on stderr."""

    def show(message, category, filename, lineno, file=None, line=None):
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        print(f"voxelopt: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():  # the filters stay Python's (ResourceWarning ignored)
        warnings.showwarning = show
        yield


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user's input or environment causes: one line, exit 2."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, ImportError)
    nib = sys.modules.get("nibabel.filebasedimages")  # only raised once nibabel is loaded
    return (*errors, nib.ImageFileError) if nib is not None else errors


def error_line(exc: BaseException) -> str:
    """The one line that describes ``exc`` (after ``voxelopt: error: ``)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return "out of memory: use a coarser --spacing (or fewer --threads)"
    if isinstance(exc, user_errors()):
        return text or type(exc).__name__
    return f"internal error ({type(exc).__name__}: {text}); VOXELOPT_DEBUG=1 shows the traceback"


def _run(argv: Sequence[str] | None) -> int:
    start = time.perf_counter()
    args = build_parser().parse_args(argv)  # --features already imports the extractors
    module, function = COMMANDS[args.command]
    run = getattr(importlib.import_module(module), function)
    import_s = time.perf_counter() - start  # torch and the rest: stages_s["import"]
    import torch

    from voxelopt import kernels
    from voxelopt.allocator import configure_from_environment
    from voxelopt.outputs import Interrupted, SignalGuard
    from voxelopt.progress import Progress

    configure_from_environment()
    threads = torch.get_num_threads()
    existed = os.path.lexists(args.out_dir)
    with SignalGuard() as guard, _warnings_as_lines():
        try:
            torch.set_num_threads(args.threads)
            progress = Progress(quiet=args.quiet)
            progress.durations["import"] = import_s
            kernels.compile_notice = progress.line  # the first use on a machine: ~25 s
            return run(args, progress, guard)
        except Interrupted as exc:
            guard.finish()
            state = "left as it was" if existed else "not created"
            if args.command == "register-batch":
                state = "keeps the pairs completed so far"
            print(f"voxelopt: interrupted by {exc.name}; {args.out_dir} {state}", file=sys.stderr)
            return exc.exit_code
        except Exception as exc:
            if os.environ.get("VOXELOPT_DEBUG") and not isinstance(exc, user_errors()):
                raise
            print(f"voxelopt: error: {error_line(exc)}", file=sys.stderr)
            return 2
        finally:
            kernels.compile_notice = None
            torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voxelopt`` console script; returns the exit code.

    Called by the console script itself (no ``argv``, from its ``__main__``), it does not
    return: see :func:`console`.
    """
    caller = sys._getframe(1).f_globals.get("__name__")
    if argv is None and caller == "__main__" and Path(sys.argv[0]).stem == "voxelopt":
        console()
    return _run(argv)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints it and exits with 1
    return 1


def console() -> None:
    """Run the command of ``sys.argv`` and end the process as soon as it is done.

    Everything a command writes is committed (renamed into place) before it returns; then
    stdout and stderr are flushed and the process leaves through ``os._exit`` without the
    interpreter's teardown (0.6 s with torch loaded). Ctrl-C before the run's signal guard
    is set (while importing) gives one line and 130; other exceptions than ``SystemExit``
    (``VOXELOPT_DEBUG=1``) propagate as usual.
    """
    try:
        code = _exit_code(_run(None))
    except SystemExit as exc:  # --help, argument errors
        code = _exit_code(exc.code)
    except KeyboardInterrupt:  # Ctrl-C while importing, before the signal guard is set
        print("voxelopt: interrupted by SIGINT", file=sys.stderr)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (voxelopt ... | head): nothing to save
            code = code or 1
    os._exit(code)
