"""Time and peak memory of the VoxelOpt solver; writes the table into BENCHMARKS.md.

Each configuration runs in a fresh subprocess (so peak resident memory is its own): random
features of the given size, one warm-up, then the median of ``--repeats`` timed runs under
``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``.

Usage:
    python benchmarks/bench_solver.py                      # full table, updates BENCHMARKS.md
    python benchmarks/bench_solver.py --sizes 96x80x128 --channels 8 --no-write
    python benchmarks/bench_solver.py --allocator keep   # only with keep_freed_memory()
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN = "<!-- bench_solver:begin -->"
MARK_END = "<!-- bench_solver:end -->"
# The reference implementation on this machine kind (2 CPU cores), from the issue.
REFERENCE_S = {"96x80x128": 12.4, "192x160x256": 138.0}
REFERENCE_PEAK_GB = {"96x80x128": 1.5}


def _child(size: str, channels: int, repeats: int, threads: int, config: str, keep: bool) -> None:
    import torch

    from voxelopt import VoxelOpt, VoxelOptConfig
    from voxelopt.allocator import keep_freed_memory

    if keep and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs Linux with glibc")
    torch.set_num_threads(threads)
    shape = tuple(int(s) for s in size.split("x"))
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, channels, *shape, generator=g)
    moving = torch.rand(1, channels, *shape, generator=g)
    solver = VoxelOpt(VoxelOptConfig(**json.loads(config)))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GB (ru_maxrss: KiB)
    times = []
    with torch.inference_mode():
        solver(fixed, moving)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            solver(fixed, moving)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "median_s": statistics.median(times),
                "times": times,
                "peak_gb": peak,
                "inputs_gb": base_rss,
            }
        )
    )


def run_case(
    size: str, channels: int, repeats: int, threads: int, config: str, keep: bool = False
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        size,
        str(channels),
        str(repeats),
        str(threads),
        config,
        str(int(keep)),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            int(sys.argv[5]),
            sys.argv[6],
            sys.argv[7] == "1",
        )
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["96x80x128", "192x160x256"])
    p.add_argument("--channels", nargs="+", type=int, default=[1, 8, 12])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default="{}", help="VoxelOptConfig fields as JSON")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    p.add_argument(
        "--allocator",
        nargs="+",
        choices=["default", "keep"],
        default=["default", "keep"],
        help="malloc policy: as is, and/or voxelopt.allocator.keep_freed_memory()",
    )
    args = p.parse_args()

    rows = []
    for size in args.sizes:
        for c, allocator in itertools.product(args.channels, args.allocator):
            r = run_case(size, c, args.repeats, args.threads, args.config, allocator == "keep")
            ref = REFERENCE_S.get(size)
            ratio = f"{ref / r['median_s']:.1f}x" if ref else "-"
            ref_mem = REFERENCE_PEAK_GB.get(size)
            rows.append(
                f"| {size} | {c} | {allocator} | {r['median_s']:.2f} | {min(r['times']):.2f} | "
                f"{r['peak_gb']:.2f} | {r['inputs_gb']:.2f} | "
                f"{ref if ref else '-'} | {ratio} | {ref_mem if ref_mem else '-'} |"
            )
            print(rows[-1], flush=True)
    command = "python benchmarks/bench_solver.py " + " ".join(sys.argv[1:])
    table = "\n".join(
        [
            MARK_BEGIN,
            f"Command: `{command.strip()}`  ",
            f"Machine: {platform.machine()}, {args.threads} threads, torch "
            f"{__import__('torch').__version__}, config {args.config}, "
            f"median of {args.repeats} after one warm-up, {time.strftime('%Y-%m-%d')}.",
            "",
            "| size (D x H x W) | channels | allocator | median s | best s | peak RSS GB "
            "| RSS before solve GB | reference s | speed-up | reference peak GB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            MARK_END,
        ]
    )
    if args.no_write:
        return
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if MARK_BEGIN in text:
        text = re.sub(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), table, text, flags=re.S)
    else:
        text += "\n" + table + "\n"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
