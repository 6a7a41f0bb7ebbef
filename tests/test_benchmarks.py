"""The benchmark scripts still run (on a tiny case, without touching BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_solver_tiny_case():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_solver.py"),
        "--sizes",
        "16x16x20",
        "--channels",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--config",
        '{"levels": 2}',
        "--no-write",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 16x16x20 | 2 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["default", "keep"]
    for row in rows:
        median_s = float(row.split("|")[4])
        assert 0 < median_s < 60
