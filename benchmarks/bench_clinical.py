"""End-to-end registration of a clinical-resolution CT pair: time and peak memory per stage.

The pair is made from one real CT (default ``../shared/data/chest_abdomen_ct``, 512 x 512 x 133,
0.70 x 0.70 x 2.5 mm, LAS): ``--slices N`` first resamples it along z to N slices over the same
z range (trilinear; labels nearest), then the fixed image is the CT warped by a known smooth
diffeomorphic field (drawn on an 8 mm grid, largest vector ``--max-disp-mm``) through the
slab warping of :mod:`voxelopt.fullres`; the moving image is the CT. Both are written as int16
NIfTI files in the CT's own orientation, with their label maps.

A fresh subprocess then does what ``voxelopt register`` does, with default options: load
the four files, :func:`voxelopt.pipeline.register_volumes` (resample, features, solve,
metrics, warp), write moved image, moved labels and the full-resolution displacement. It
records wall and CPU seconds per stage, the peak resident set (``ru_maxrss`` and a thread
sampling ``VmRSS`` every 10 ms, per stage), and the endpoint error against the known field on
the working grid. Results are printed as a markdown table (and JSON with ``--json``).

Usage:
    python benchmarks/bench_clinical.py --slices 250            # 512 x 512 x 250
    python benchmarks/bench_clinical.py                          # the CT's own 133 slices
    python benchmarks/bench_clinical.py --synthetic 96x96x40     # phantom, no shared data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _canonical_grid(volume, slices: int):
    from voxelopt.io import Volume

    affine = volume.affine.copy()
    n = volume.shape[2]
    affine[:3, 2] *= (n - 1) / (slices - 1)
    shape = (*volume.shape[:2], slices)
    return Volume(np.broadcast_to(np.float32(0), shape), affine, volume.ornt.copy())


def make_pair(args, folder: Path) -> dict:
    """Write fixed/moving images and labels to ``folder``; return the pair's description."""
    import torch

    from voxelopt.ct import AIR_HU
    from voxelopt.fullres import warp_to_fixed
    from voxelopt.grid import resample_to_grid, working_grid
    from voxelopt.io import Volume, load_labels, load_volume, save_volume
    from voxelopt.phantom import make_phantom, random_smooth_displacement

    if args.synthetic:
        shape = tuple(int(s) for s in args.synthetic.split("x"))
        spacing = (0.8, 0.8, 2.0)
        hu, lab = make_phantom(shape, spacing=spacing, seed=0)
        ornt = np.array([[0, -1], [1, 1], [2, 1]])  # written as an LAS file, like the CT
        canonical = np.diag([*spacing, 1.0])
        ct = Volume(hu, canonical, ornt)
        labels = Volume(lab, canonical, ornt)
    else:
        folder_ct = Path(args.ct)
        ct = load_volume(folder_ct / "ct.nii.gz")
        labels = load_labels(folder_ct / "labels_btcv13.nii.gz")
    if args.slices and args.slices != ct.shape[2]:
        grid = _canonical_grid(ct, args.slices)
        ct = resample_to_grid(ct, grid, 1, AIR_HU)
        labels = resample_to_grid(labels, grid, 0, 0)
    coarse = working_grid(ct, 8.0)
    true = random_smooth_displacement(
        coarse.shape,
        args.max_disp_mm,
        control_spacing=40.0,
        seed=args.seed,
        diffeomorphic=True,
        spacing=coarse.spacing,
    )
    fixed = warp_to_fixed(ct, true, coarse, ct, 1, AIR_HU)
    fixed_labels = warp_to_fixed(labels, true, coarse, ct, 0, 0, dtype=np.int16)
    for name, data, like in (
        ("fixed", np.rint(fixed), ct),
        ("moving", np.rint(ct.data), ct),
        ("fixed_labels", fixed_labels, ct),
        ("moving_labels", labels.data, ct),
    ):
        save_volume(data, like, folder / f"{name}.nii.gz", dtype=np.int16)
    torch.save({"disp": true, "affine": coarse.affine, "shape": coarse.shape}, folder / "true.pt")
    return {"shape": list(ct.shape), "spacing_mm": [round(s, 4) for s in ct.spacing]}


class _Meter:
    """Wall and CPU seconds and peak RSS (sampled) of named stages."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.peak = 0
        self._current = 0
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) * 1024

    def _sample(self) -> None:
        while True:
            r = self.rss()
            self._current = max(self._current, r)
            self.peak = max(self.peak, r)
            time.sleep(0.01)

    def start(self, name: str) -> None:
        self._current = self.rss()
        self.rows[name] = {"t0": time.perf_counter(), "c0": time.process_time()}

    def end(self, name: str) -> None:
        row = self.rows[name]
        row["wall_s"] = time.perf_counter() - row.pop("t0")
        row["cpu_s"] = time.process_time() - row.pop("c0")
        row["peak_gb"] = max(self._current, self.rss()) / 1e9


def run(folder: Path, args) -> dict:
    """The measured run (in its own process): load, register_volumes, write."""
    import torch

    from voxelopt.allocator import configure_from_environment

    configure_from_environment()  # as the command line does
    torch.set_num_threads(args.threads)
    from voxelopt.io import load_labels, load_volume
    from voxelopt.nifti_stream import write_volume
    from voxelopt.pipeline import register_volumes

    meter = _Meter()
    start = time.perf_counter()
    meter.start("load")
    fixed, moving = load_volume(folder / "fixed.nii.gz"), load_volume(folder / "moving.nii.gz")
    fl, ml = (
        load_labels(folder / "fixed_labels.nii.gz"),
        load_labels(folder / "moving_labels.nii.gz"),
    )
    meter.end("load")

    def progress(stage: str, event: str, info: dict) -> None:
        if event in ("start", "end"):
            getattr(meter, event)(stage)

    result = register_volumes(
        fixed,
        moving,
        fixed_labels=fl,
        moving_labels=ml,
        extractor=args.features,
        progress=progress,
        **({"budget_voxels": args.budget} if args.budget else {}),
    )
    out = folder / "out"
    out.mkdir(exist_ok=True)
    meter.start("write")
    write_volume(result.moved, fixed, out / "moved.nii.gz", np.float32)
    write_volume(result.moved_labels, fixed, out / "moved_labels.nii.gz", np.int16)
    t0 = time.perf_counter()
    result.write_displacement(out / "displacement.nii.gz")
    write_disp = time.perf_counter() - t0
    meter.end("write")
    total = time.perf_counter() - start
    t0 = time.perf_counter()
    result.write_displacement(out / "displacement_working.nii.gz", grid="working")
    write_working = time.perf_counter() - t0
    return {
        "stages": meter.rows,
        "total_s": total,
        "total_cpu_s": sum(r["cpu_s"] for r in meter.rows.values()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "sampled_peak_gb": meter.peak / 1e9,
        "write_displacement_s": write_disp,
        "write_working_displacement_s": write_working,
        "working_shape": list(result.working_grid.shape),
        "working_spacing_mm": [round(s, 3) for s in result.working_grid.spacing],
        "scores": result.metrics,
        "epe_mm": _epe(folder, result),
        "threads": args.threads,
    }


def _epe(folder: Path, result) -> dict:
    """Endpoint error (mm) against the known field on the working grid, inside the body."""
    import torch

    from voxelopt.ct import AIR_HU, BODY_HU
    from voxelopt.grid import resample_to_grid
    from voxelopt.io import load_volume
    from voxelopt.transform import resize_displacement

    true = torch.load(folder / "true.pt", weights_only=False)
    grid = result.working_grid
    t = resize_displacement(true["disp"], grid.shape)  # both grids span the fixed box
    spacing = torch.tensor(grid.spacing).view(1, 3, 1, 1, 1)
    fixed_w = resample_to_grid(load_volume(folder / "fixed.nii.gz"), grid, 1, AIR_HU).data
    body = torch.from_numpy(np.ascontiguousarray(fixed_w) > BODY_HU)
    err = ((result.displacement_working - t) * spacing).norm(dim=1)[0][body]
    before = (t * spacing).norm(dim=1)[0][body]
    return {
        "mean": float(err.mean()),
        "median": float(err.median()),
        "p95": float(err.quantile(0.95)),
        "before": float(before.mean()),
        "before_median": float(before.median()),
    }


def _x(values, sep: str = "x") -> str:
    return sep.join(str(v) for v in values)


def _table(info: dict, res: dict) -> str:
    lines = [
        f"Pair {_x(info['shape'])} voxels ({_x(info['spacing_mm'], ' x ')} mm); working grid "
        f"{_x(res['working_shape'])} ({_x(res['working_spacing_mm'], ' x ')} mm); "
        f"{res['threads']} threads.",
        "",
        "| stage | wall s | CPU s | peak RSS GB |",
        "|---|---|---|---|",
    ]
    for name, row in res["stages"].items():
        lines.append(
            f"| {name} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['peak_gb']:.2f} |"
        )
    lines.append(
        f"| **total** | **{res['total_s']:.1f}** | {res['total_cpu_s']:.1f} | "
        f"**{res['peak_rss_gb']:.2f}** (ru_maxrss) |"
    )
    s = res["scores"]
    lines += [
        "",
        f"Writing the full-resolution displacement.nii.gz: {res['write_displacement_s']:.1f} s; "
        f"the working-grid field instead: {res['write_working_displacement_s']:.2f} s.",
        f"Endpoint error in the body on the working grid: {res['epe_mm']['mean']:.2f} mm mean, "
        f"{res['epe_mm']['median']:.2f} mm median, {res['epe_mm']['p95']:.2f} mm p95 "
        f"(true field {res['epe_mm']['before']:.2f} mm mean, "
        f"{res['epe_mm']['before_median']:.2f} mm median); "
        f"Dice {s.get('dice')}, SDlogJ {s.get('sdlogj_l2r')}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", default=str(ROOT.parent / "shared" / "data" / "chest_abdomen_ct"))
    p.add_argument("--synthetic", help="DxHxW phantom instead of the CT (tests)")
    p.add_argument("--slices", type=int, default=0, help="resample the CT to N slices first")
    p.add_argument("--max-disp-mm", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="mind")
    p.add_argument("--budget", type=int, default=0, help="voxel budget (default: the library's)")
    p.add_argument("--budgets", type=int, nargs="+", help="run once per budget, same pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--write",
        action="store_true",
        help="put the tables into BENCHMARKS.md (between the bench_clinical markers)",
    )
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # child: the measured run
    args = p.parse_args(argv)
    if args.run is not None:
        print(json.dumps(run(args.run, args)))
        return 0
    if os.environ.get("VOXELOPT_SHARED"):
        args.ct = str(Path(os.environ["VOXELOPT_SHARED"]) / "data" / "chest_abdomen_ct")
    budgets = args.budgets or [args.budget]
    results, blocks = [], []
    with tempfile.TemporaryDirectory(prefix="bench_clinical_") as tmp:
        info = make_pair(args, Path(tmp))
        for budget in budgets:
            cmd = [
                sys.executable,
                __file__,
                "--run",
                tmp,
                "--features",
                args.features,
                "--threads",
                str(args.threads),
                "--budget",
                str(budget),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results.append({"budget": budget, **res})
            blocks.append(_table(info, res))
            print(blocks[-1] + "\n", flush=True)
    if len(results) > 1:
        blocks.append(_budget_table(results))
        print(blocks[-1])
    if args.write:
        from voxelopt.tables import write_marked_block

        command = "python benchmarks/bench_clinical.py " + " ".join(sys.argv[1:])
        text = f"`OMP_NUM_THREADS={args.threads} {command.strip()}`\n\n" + "\n\n".join(blocks)
        write_marked_block(ROOT / "BENCHMARKS.md", "bench_clinical", text)
    if args.json:
        args.json.write_text(json.dumps({"pair": info, "runs": results}, indent=2))
    return 0


def _budget_table(results: list[dict]) -> str:
    """One line per voxel budget: working grid, features + solve time, peak, accuracy."""
    lines = [
        "| budget (voxels) | working grid | spacing mm | features + solve s (CPU s) | "
        "peak RSS GB | total s | EPE mean / median mm | Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        st = r["stages"]
        fs = st["features"]["wall_s"] + st["solve"]["wall_s"]
        cpu = st["features"]["cpu_s"] + st["solve"]["cpu_s"]
        lines.append(
            f"| {r['budget'] or 'default'} | {'x'.join(map(str, r['working_shape']))} | "
            f"{r['working_spacing_mm'][0]:.2f} | {fs:.1f} ({cpu:.1f}) | {r['peak_rss_gb']:.2f} | "
            f"{r['total_s']:.1f} | {r['epe_mm']['mean']:.2f} / {r['epe_mm']['median']:.2f} | "
            f"{r['scores'].get('dice')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
