"""The benchmark scripts still run (on a tiny case, without touching BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _gpu_check():
    """benchmarks/gpu_check.py as a module (it is a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_is_one_line_and_exit_code_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: gpu_check runs instead of refusing")
    assert _gpu_check().main(["--no-tests"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("gpu_check: CUDA is not available") and "--device cpu" in err


def test_gpu_check_cpu_tiny(tmp_path, capsys):
    from voxelopt.paths import abdomen_ct_dir

    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nprose stays\n")
    args = "--device cpu --sizes 12x14x16 --channels 2 --repeats 1 --levels 2 --downsample 4"
    code = _gpu_check().main([*args.split(), "--seeds", "0", "--write", "--output", str(target)])
    assert code == 0
    text = target.read_text()
    assert text.startswith("# Benchmarks\n\nprose stays\n") and "<!-- gpu_check:end -->" in text
    tests_line = next(line for line in text.splitlines() if line.startswith("CUDA tests"))
    if not torch.cuda.is_available():  # every test that -k cuda selects skips, with the reason
        assert "skipped" in tests_line and "passed" not in tests_line
        assert "CUDA is not available" in tests_line
    rows = [line for line in text.splitlines() if line.startswith("| 12x14x16 | 2 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["float32", "float16", "bfloat16"]
    assert all(0 < float(row.split("|")[4]) < 60 for row in rows)
    if abdomen_ct_dir().is_dir():  # the real-CT table: a finite field and a Dice per precision
        ct = [line for line in text.splitlines() if line.startswith(("| float", "| bfloat"))]
        assert len(ct) == 3 and all(row.split("|")[-2].strip() == "yes" for row in ct)
        assert all(0 < float(row.split("|")[2]) <= 100 for row in ct)
    assert "updated" in capsys.readouterr().out


def _intersubject_row(direction: str, method: str, dice: float | None, **extra) -> dict:
    scores = {"dice_1": dice, "dice_6": dice, "dice": dice, "hd95": 10.0, "sdlogj_l2r": 0.1}
    scores["nonpositive_jacobian"] = 0.0
    row = {"direction": direction, "method": method, "start": "ours (align_affine)"}
    row |= {"wall_s": 1.0, "cpu_s": 2.0, "load_before": 0.5, "covered": 0.9}
    return row | {"own": scores, "common": scores, "command": "python bench ..."} | extra


def test_bench_intersubject_tables_and_benchmarks_block(tmp_path):
    """--tables-only --write from saved rows: the summary, the per-organ tables, the marked
    block with the command and the figure link; the stand-in rows only when asked for."""
    rows = {
        "abd_from_chest": [
            _intersubject_row("abdomen<-chest", "initial_affine", 0.6),
            _intersubject_row("abdomen<-chest", "voxelopt_mind_fixed_fovmask", 0.9),
        ],
        "chest_from_abd": [
            _intersubject_row("chest<-abdomen", "initial_affine", 0.4),
            _intersubject_row("chest<-abdomen", "ants", None, start="-", failed="stopped"),
        ],
    }
    for tag, rs in rows.items():
        (tmp_path / f"rows_{tag}.json").write_text(json.dumps(rs))
    (tmp_path / "intersubject_abd_from_chest.png").write_bytes(b"")
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nprose\n")
    script = str(ROOT / "benchmarks" / "bench_intersubject.py")
    cmd = [sys.executable, script, "--tables-only", "--out", str(tmp_path)]
    cmd += ["--figures", str(tmp_path), "--write", str(markdown)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "summary.md").read_text()
    assert "| Initial | ours (align_affine) | 60.0 | 40.0 | 50.0 | 50.0 | 10.0 |" in summary
    assert "| ANTs SyN | - | - | - | - |" in summary
    assert "fovmask" not in summary and "VoxelOpt" not in summary
    assert "| Initial | ours (align_affine) | 60.0 | 60.0 | 60.0 |" in summary  # per organ
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nprose\n")
    block = text.split("<!-- bench_intersubject:begin -->")[1].split("<!-- bench_intersubject:end")
    assert "python bench ..." in block[0] and "| Initial | ours (align_affine) | 60.0" in block[0]
    assert "(intersubject_abd_from_chest.png)" in block[0] and "chest_from_abd.png" not in block[0]
    subprocess.run([*cmd, "--stand-in-fov-mask"], check=True, capture_output=True, timeout=120)
    assert (
        "| VoxelOpt MIND, fixed sigma | ours (align_affine) | 90.0 |"
        in (tmp_path / "summary.md").read_text()
    )
