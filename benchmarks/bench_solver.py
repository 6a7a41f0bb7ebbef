"""Time and peak memory of the VoxelOpt solver; writes the table into BENCHMARKS.md.

Each configuration runs in a fresh subprocess (so peak resident memory is its own): random
features of the given size, one warm-up (its time is the "first call": numba's cache load, or
its compilation on a machine that has none yet), then the median of ``--repeats`` timed runs
under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``. With ``--rounds``
the whole list of configurations is run that many times, interleaved (round 1 of every
configuration, then round 2, ...), so that the load of a shared machine falls on all of them
alike; the table gives the median of the rounds' medians, and the ``vs torch`` column the
ratio of the torch backend's median to each row's, taken round by round.

Usage:
    python benchmarks/bench_solver.py                      # full table, updates BENCHMARKS.md
    python benchmarks/bench_solver.py --sizes 96x80x128 --channels 8 --no-write
    python benchmarks/bench_solver.py --allocator keep   # only with keep_freed_memory()
    python benchmarks/bench_solver.py --backend torch numba --rounds 3   # side by side
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The reference implementation on this machine kind (2 CPU cores), from the issue.
REFERENCE_S = {"96x80x128": 12.4, "192x160x256": 138.0}
REFERENCE_PEAK_GB = {"96x80x128": 1.5}


def _child(
    size: str, channels: int, repeats: int, threads: int, config: str, keep: bool, backend: str
) -> None:
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
    solver = VoxelOpt(VoxelOptConfig(**{**json.loads(config), "backend": backend}))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GB (ru_maxrss: KiB)
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        solver(fixed, moving)  # warm-up
        first = time.perf_counter() - start
        for _ in range(repeats):
            start = time.perf_counter()
            solver(fixed, moving)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "median_s": statistics.median(times),
        "times": times,
        "peak_gb": peak,
        "inputs_gb": base_rss,
        "first_s": first,
    }
    print(json.dumps(result))


def run_case(
    size: str,
    channels: int,
    repeats: int,
    threads: int,
    config: str,
    keep: bool = False,
    backend: str = "auto",
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
        backend,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _parse() -> argparse.Namespace:
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
    p.add_argument(
        "--backend",
        nargs="+",
        choices=["auto", "torch", "numba"],
        default=["auto"],
        help="VoxelOptConfig.backend: the torch operators and/or the fused numba kernels",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="run every configuration this often, interleaved"
    )
    return p.parse_args()


def _row(size: str, c: int, allocator: str, backend: str, runs: list[dict], vs: str) -> str:
    medians = [r["median_s"] for r in runs]
    median = statistics.median(medians)
    ref, ref_mem = REFERENCE_S.get(size), REFERENCE_PEAK_GB.get(size)
    ratio = f"{ref / median:.1f}x" if ref else "-"
    rounds = ", ".join(f"{m:.2f}" for m in medians)
    return (
        f"| {size} | {c} | {allocator} | {median:.2f} | {min(min(r['times']) for r in runs):.2f} | "
        f"{max(r['peak_gb'] for r in runs):.2f} | {runs[0]['inputs_gb']:.2f} | "
        f"{ref if ref else '-'} | {ratio} | {ref_mem if ref_mem else '-'} | {backend} | {vs} | "
        f"{max(r['first_s'] for r in runs):.2f} | {rounds} |"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            int(sys.argv[5]),
            sys.argv[6],
            sys.argv[7] == "1",
            sys.argv[8] if len(sys.argv) > 8 else "auto",
        )
        return
    args = _parse()
    cases = list(itertools.product(args.sizes, args.channels, args.allocator, args.backend))
    runs: dict[tuple, list[dict]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            size, c, allocator, backend = case
            keep = allocator == "keep"
            runs[case].append(
                run_case(size, c, args.repeats, args.threads, args.config, keep, backend)
            )
            print(f"{case}: {runs[case][-1]['median_s']:.3f} s", file=sys.stderr, flush=True)
    rows = []
    for case in cases:
        size, c, allocator, backend = case
        torch_runs = runs.get((size, c, allocator, "torch"))
        vs = "-"
        if torch_runs and backend != "torch":  # round by round, then the median
            ratios = [
                t["median_s"] / r["median_s"] for t, r in zip(torch_runs, runs[case], strict=True)
            ]
            vs = f"{statistics.median(ratios):.2f}x"
        rows.append(_row(size, c, allocator, backend, runs[case], vs))
        print(rows[-1], flush=True)
    command = "python benchmarks/bench_solver.py " + " ".join(sys.argv[1:])
    table = "\n".join(
        [
            f"Command: `{command.strip()}`  ",
            f"Machine: {platform.machine()}, {args.threads} threads, torch "
            f"{__import__('torch').__version__}, config {args.config}, "
            f"median of {args.repeats} after one warm-up, {args.rounds} interleaved round(s), "
            f"{time.strftime('%Y-%m-%d')}.",
            "",
            "| size (D x H x W) | channels | allocator | median s | best s | peak RSS GB "
            "| RSS before solve GB | reference s | speed-up | reference peak GB | backend "
            "| vs torch | first call s | round medians s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    if args.no_write:
        return
    from voxelopt.tables import write_marked_block

    path = write_marked_block(ROOT / "BENCHMARKS.md", "bench_solver", table, "# Benchmarks")
    print(f"updated {path}")


if __name__ == "__main__":
    main()
