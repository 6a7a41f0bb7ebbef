"""One command for a user with a GPU: the CUDA tests, half precision against float32, timings.

On ``--device`` (default ``cuda``), in this order:

1. the CUDA tests, ``python -m pytest -q tests/test_device_paths.py -k cuda``: each operator
   and the whole solver on the GPU against the CPU, float16 and bfloat16 against float32, and
   half precision's peak memory (without a GPU they skip, saying why);
2. the real-CT pair: synthetic pairs of the shared abdominal CT
   (:func:`voxelopt.data.make_pairs`: the 3 mm CT warped by a known smooth field of at most
   15 mm, moving image with a smooth intensity bias and noise), registered with MIND features
   and the solver's torch operators at every ``--precisions`` entry; Dice over the organs and
   endpoint error in the body from :func:`voxelopt.evaluation.score_registration`, and how far
   each field is from the float32 one;
3. the solver alone on random features of ``--sizes`` (``--channels`` channels) at every
   precision: median of ``--repeats`` runs after one warm-up, CUDA synchronised
   (:func:`voxelopt.evaluation.timed`), and the peak GPU memory above what was allocated
   before (``torch.cuda.max_memory_allocated``).

It prints one Markdown block; ``--write`` also puts it into BENCHMARKS.md between the
``gpu_check`` markers (:func:`voxelopt.tables.write_marked_block`). Without CUDA it stops with a
one-line message and exit code 2. ``--device cpu`` runs the same steps on the CPU (torch
operators), a smoke test of this script on tiny sizes. The exit code is 1 when a CUDA test
failed.

Usage:
    python benchmarks/gpu_check.py --write
    python benchmarks/gpu_check.py --device cpu --sizes 24x24x24 --channels 2 --repeats 1 \
        --levels 3 --downsample 3 --seeds 0
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from voxelopt import VoxelOpt, VoxelOptRegistration
from voxelopt.ct import body_mask
from voxelopt.evaluation import score_registration, timed
from voxelopt.paths import abdomen_ct_dir
from voxelopt.tables import markdown_table, write_marked_block

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "float16", "bfloat16")
TEST_FILE = "tests/test_device_paths.py"


class DeviceUnavailable(Exception):
    """The requested device cannot be used (the one-line message says why)."""


def _size(text: str) -> tuple[int, int, int]:
    """``"96x80x128"`` -> ``(96, 80, 128)``."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a size is DxHxW in voxels, e.g. 96x80x128, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke test)")
    p.add_argument("--sizes", nargs="+", type=_size, default=[(96, 80, 128), (192, 160, 256)])
    p.add_argument("--channels", type=int, default=8, help="feature channels of the timings")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--levels", type=int, default=5, help="pyramid levels of every solve")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="real-CT pairs")
    p.add_argument("--downsample", type=int, default=1, help="of the shared 3 mm CT")
    p.add_argument("--max-disp", type=float, default=15.0, help="true field's largest, mm")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests (step 1)")
    p.add_argument("--write", action="store_true", help="put the block into --output")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    for name in ("channels", "repeats", "levels", "downsample"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def select_device(name: str) -> torch.device:
    """``torch.device(name)`` if it can run here, else :class:`DeviceUnavailable`."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"--device must be cuda, cuda:N or cpu, got {name!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise DeviceUnavailable(f"--device must be cuda, cuda:N or cpu, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"CUDA is not available (torch {torch.__version__}): run this on a machine with an "
            f"NVIDIA GPU and a CUDA build of torch, or with --device cpu for a smoke test"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceUnavailable(f"{name} does not exist: {torch.cuda.device_count()} GPU(s) seen")
    return device


def run_gpu_tests() -> dict:
    """Step 1: ``pytest -k cuda`` on the device-path tests in a subprocess.

    Returns:
        ``{"command", "summary" (pytest's last line), "skip_reasons" (set), "failed" (bool),
        "output" (pytest's output)}``.
    """
    command = f"python -m pytest -q {TEST_FILE} -k cuda"
    if importlib.util.find_spec("pytest") is None:
        summary = "not run: pytest is not installed (pip install -e '.[dev]')"
        return {"command": command, "summary": summary, "skip_reasons": set(), "failed": False}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TEST_FILE]
    cmd += ["-k", "cuda"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    lines = [line.strip("= ").strip() for line in output.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"\d+ \w+.* in ", line)), "")
    reasons = {
        line.split(": ", 1)[1] for line in lines if line.startswith("SKIPPED") and ": " in line
    }
    return {
        "command": command,
        "summary": summary or f"pytest ended with exit code {proc.returncode}",
        "skip_reasons": reasons,
        "failed": proc.returncode not in (0, 5),  # 5: nothing selected
        "output": output,
    }


def _field_gap(disp: torch.Tensor, ref: torch.Tensor, body: torch.Tensor) -> float:
    """Mean over the body of the largest component of ``|disp - ref|`` (voxels)."""
    return float((disp - ref).abs().amax(1)[0][body].mean())


def real_ct_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Step 2: the identity's row and one per precision, means over the ``--seeds`` pairs."""
    from voxelopt.data import make_pairs

    pairs = make_pairs("ct", args.seeds, args.downsample, args.max_disp)
    scores = {p: [] for p in ("identity", *args.precisions)}
    gaps = {p: [] for p in args.precisions}
    finite = dict.fromkeys(scores, True)
    for pair in pairs:
        body = body_mask(pair.fixed_hu)[0, 0]
        fields = {"identity": torch.zeros_like(pair.true_disp)}
        for precision in args.precisions:
            model = VoxelOptRegistration(
                "mind", levels=args.levels, precision=precision, backend="torch"
            ).to(device)
            with torch.inference_mode():
                fixed, moving = pair.fixed_hu.to(device), pair.moving_hu.to(device)
                fields[precision] = model(fixed, moving).float().cpu()
        for name, disp in fields.items():
            finite[name] = finite[name] and bool(torch.isfinite(disp).all())
            scores[name].append(
                score_registration(
                    disp,
                    spacing=pair.spacing,
                    fixed_labels=pair.fixed_labels,
                    moving_labels=pair.moving_labels,
                    true_displacement=pair.true_disp,
                    mask=body,
                )
            )
            if name in gaps and "float32" in fields:
                gaps[name].append(_field_gap(disp, fields["float32"], body))
    return _real_ct_table_rows(scores, gaps, finite)


def _real_ct_table_rows(scores: dict, gaps: dict, finite: dict) -> list[dict]:
    """Rows of the real-CT table from the per-pair scores, field gaps and finiteness."""
    mean = statistics.fmean
    dice32 = mean(s.dice_mean for s in scores["float32"]) if "float32" in scores else None
    rows = []
    for name, pair_scores in scores.items():
        dice = mean(s.dice_mean for s in pair_scores)
        folding = mean(s.nonpositive_jacobian for s in pair_scores)
        rows.append(
            {
                "precision": name,
                "Dice %": f"{100 * dice:.2f}",
                "vs float32 (points)": "-" if dice32 is None else f"{100 * (dice - dice32):+.2f}",
                "EPE body mm": f"{mean(s.epe_mm for s in pair_scores):.2f}",
                "non-positive det J %": f"{100 * folding:.3f}",
                "mean abs(u - u_float32) body voxels": (
                    f"{mean(gaps[name]):.3f}" if gaps.get(name) else "-"
                ),
                "finite": "yes" if finite[name] else "no",
            }
        )
    return rows


def time_solver(
    shape: tuple[int, int, int], precision: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """Step 3 for one size and precision: median and best seconds, peak GPU memory (GB)."""
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, args.channels, *shape, generator=g).to(device)
    moving = torch.rand(1, args.channels, *shape, generator=g).to(device)
    solver = VoxelOpt(levels=args.levels, backend="torch", precision=precision)
    cuda = device.type == "cuda"
    row = {"size": "x".join(map(str, shape)), "channels": args.channels, "precision": precision}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        with torch.inference_mode():
            times = [
                timed(lambda: solver(fixed, moving), device)[1] for _ in range(args.repeats + 1)
            ]
    except torch.cuda.OutOfMemoryError:
        return {**row, "median s": "out of memory", "best s": "-", "first s": "-", "peak GB": "-"}
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else None
    return {
        **row,
        "median s": f"{statistics.median(times[1:]):.3f}",
        "best s": f"{min(times[1:]):.3f}",
        "first s": f"{times[0]:.3f}",
        "peak GB": "-" if peak is None else f"{peak:.2f}",
    }


def machine_line(device: torch.device) -> str:
    """Device, torch and CUDA versions, TF32 setting and the date."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        what = (
            f"{name} ({total:.0f} GB), CUDA {torch.version.cuda}, TF32 matmul "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
        )
    else:
        threads = torch.get_num_threads()
        what = f"CPU ({platform.machine()}, {threads} thread(s); smoke test)"
    return f"Device: {what}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}."


def render(args, device, tests: dict | None, ct_rows: list[dict] | str, time_rows) -> str:
    """The Markdown block of the whole check."""
    words = sys.argv[1:] if args.argv is None else args.argv
    command = "python benchmarks/gpu_check.py " + " ".join(words)
    lines = [f"Command: `{command.strip()}`  ", machine_line(device), ""]
    if tests is None:
        lines.append("CUDA tests: not run (--no-tests).")
    else:
        reasons = "; ".join(sorted(tests["skip_reasons"]))
        lines.append(
            f"CUDA tests (`{tests['command']}`): {tests['summary']}"
            + (f" (skipped: {reasons})" if reasons else "")
            + "."
        )
    lines += ["", f"Real-CT pairs (MIND, {args.levels} levels, seeds {args.seeds}, "]
    lines[-1] += f"downsample {args.downsample}, true field up to {args.max_disp:g} mm; means):"
    lines.append("")
    lines.append(ct_rows if isinstance(ct_rows, str) else markdown_table(ct_rows).rstrip())
    lines += ["", f"Solver alone, random features, {args.levels} levels, median of "]
    lines[-1] += f"{args.repeats} after one warm-up (first s: the warm-up), torch operators:"
    lines += ["", markdown_table(time_rows).rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit code (0 ok, 1 a CUDA test failed, 2 no device)."""
    args = parse_args(argv)
    args.argv = argv
    try:
        device = select_device(args.device)
    except DeviceUnavailable as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    tests = None if args.no_tests else run_gpu_tests()
    if tests is not None and tests["failed"]:
        print(tests["output"], file=sys.stderr)
    if abdomen_ct_dir().is_dir():
        ct_rows = real_ct_rows(args, device)
    else:
        ct_rows = f"The shared real CT is absent ({abdomen_ct_dir()}): not measured."
    time_rows = [time_solver(s, p, args, device) for s in args.sizes for p in args.precisions]
    block = render(args, device, tests, ct_rows, time_rows)
    print(block, flush=True)
    if args.write:
        path = write_marked_block(args.output, "gpu_check", block, "# Benchmarks")
        print(f"updated {path}")
    return 1 if tests is not None and tests["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
