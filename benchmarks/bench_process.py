"""Whole-process wall time of the command line, with its breakdown; BENCHMARKS.md keeps it.

Measures, as a user would start them, ``voxelopt --help``, ``voxelopt register --features
mind`` and ``voxelopt register --features raw`` on a 96 x 80 x 128 phantom pair at 3 mm with
its organ labels (written once to a temporary folder), and ``python -c "import torch"`` in the
same run: ``--rounds`` interleaved rounds (every command once per round, in turn), so that the
load of a shared machine falls on all of them alike. The table gives the median wall time, its
ratio to importing torch (taken round by round), and for ``register`` the median of each part:

* ``start``: wall time before the first stage, less the import: the interpreter, the parser;
* ``import``: torch and the command's modules (``stages_s["import"]`` of report.json);
* ``load`` ... ``write``: the stages of report.json's ``stages_s``;
* ``exit``: from report.json's last write (its mtime) until the process has ended: the swap of
  the output folder, flushing, leaving.

Usage:
    python benchmarks/bench_process.py                  # prints the table
    python benchmarks/bench_process.py --rounds 5 --write   # also updates BENCHMARKS.md
    python benchmarks/bench_process.py --affine affine      # with the default pre-alignment

The register runs pass ``--affine none`` (the deformable registration
alone, as in issue 13's measurement) unless ``--affine`` says otherwise; the children inherit
this process's environment (``OMP_NUM_THREADS`` included) and use the CPU cores available. On
a machine shared with other work, two threads can be slower than one (each small torch
operation waits for both threads): compare ``--rounds`` and the ranges, not one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (96, 80, 128)
STAGES = {
    "load": ("loading",),
    "affine": ("affine",),
    "features": ("resampling", "features"),
    "solve": ("solving",),
    "metrics": ("metrics",),
    "write": ("warping", "writing"),
}


def voxelopt_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m voxelopt.cli``."""
    script = Path(sys.executable).parent / "voxelopt"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "voxelopt.cli"]


def make_pair(folder: Path) -> dict[str, Path]:
    """The 96 x 80 x 128 phantom pair with labels as NIfTI files in ``folder``."""
    import numpy as np

    from voxelopt.demo import demo_pair
    from voxelopt.io import save_volume

    pair, like = demo_pair(shape=SHAPE, seed=0)
    files = {}
    for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
        labels = "labels" in name
        data = np.asarray(getattr(pair, name if labels else f"{name}_hu")[0, 0])
        dtype = np.int16 if labels else np.float32
        files[name] = save_volume(data, like, folder / f"{name}.nii.gz", dtype=dtype)
    return files


def commands(files: dict[str, Path], folder: Path, affine: str) -> dict[str, list[str]]:
    exe = voxelopt_command()
    inputs = [f"--{k.replace('_', '-')}={v}" for k, v in files.items()]
    reg = [*exe, "register", *inputs, f"--affine={affine}", "--quiet"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "voxelopt --help": [*exe, "--help"],
        "register --features mind": [*reg, "--features=mind", f"--out-dir={folder / 'mind'}"],
        "register --features raw": [*reg, "--features=raw", f"--out-dir={folder / 'raw'}"],
    }


def run_once(command: list[str]) -> dict:
    """Wall time of one process, and for a register run its report's stages and exit time."""
    out_dir = next((a.split("=", 1)[1] for a in command if a.startswith("--out-dir=")), None)
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    result = {"wall": wall}
    if out_dir is not None:
        report = Path(out_dir) / "report.json"
        stages = json.loads(report.read_text())["stages_s"]
        result["stages"] = stages
        result["exit"] = max(ended - report.stat().st_mtime, 0.0)
    return result


def breakdown(result: dict) -> dict[str, float]:
    """Parts of one register run (seconds): start, import, the stages, exit."""
    stages = dict(result["stages"])
    parts = {"import": stages.pop("import", 0.0)}
    for part, names in STAGES.items():
        parts[part] = sum(stages.pop(n, 0.0) for n in names)
    parts["exit"] = result["exit"]
    parts["start"] = result["wall"] - sum(parts.values()) - sum(stages.values())
    return parts


def measure(cmds: dict[str, list[str]], rounds: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in cmds}
    for command in cmds.values():  # warm-up: file caches, numba's cache
        run_once(command)
    for r in range(rounds):
        for name, command in cmds.items():
            results[name].append(run_once(command))
            print(
                f"round {r + 1}/{rounds} {name}: {results[name][-1]['wall']:.2f} s", file=sys.stderr
            )
    return results


def table(results: dict[str, list[dict]]) -> str:
    from voxelopt.tables import markdown_table

    base = [r["wall"] for r in results['python -c "import torch"']]
    parts_cols = [
        "start",
        "import",
        "load",
        "affine",
        "features",
        "solve",
        "metrics",
        "write",
        "exit",
    ]
    rows = []
    for name, runs in results.items():
        walls = [r["wall"] for r in runs]
        ratio = statistics.median(w / b for w, b in zip(walls, base, strict=True))
        row = {
            "command": f"`{name}`",
            "median s": f"{statistics.median(walls):.2f}",
            "range s": f"{min(walls):.2f}-{max(walls):.2f}",
            "/ import torch": f"{ratio:.2f}",
        }
        for col in parts_cols:
            row[col] = "-"
        if "stages" in runs[0]:
            parts = [breakdown(r) for r in runs]
            for col in parts_cols:
                row[col] = f"{statistics.median(p[col] for p in parts):.2f}"
        rows.append(row)
    return markdown_table(rows, fmt=str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--affine", choices=["none", "rigid", "affine"], default="none")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_process_") as tmp:
        folder = Path(tmp)
        cmds = commands(make_pair(folder), folder, args.affine)
        results = measure(cmds, args.rounds)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    block = (
        f"Whole process, {args.rounds} interleaved rounds after one warm-up, median; "
        f"{SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} phantom pair at 3 mm with 13 organ labels, "
        f"`--affine {args.affine} --quiet`; {cores} cores, Python {platform.python_version()}, "
        f"`{' '.join(Path(c).name for c in voxelopt_command())}`. Parts of a register run "
        "(medians, seconds): start = interpreter and parser, import = torch and the "
        "command's modules, features = resampling and features, write = warping and "
        "writing the files, exit = after report.json until the process has ended. "
        "Measured by `python benchmarks/bench_process.py"
        f"{f' --rounds {args.rounds}' if args.rounds != 3 else ''}"
        f"{f' --affine {args.affine}' if args.affine != 'none' else ''} --write`.\n\n"
        + table(results)
    )
    print(block)
    if args.write:
        from voxelopt.tables import write_marked_block

        path = write_marked_block(ROOT / "BENCHMARKS.md", "bench_process", block)
        print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
