"""Fields of view on the shared CT: blanked slices, a shorter copy, an affine start (issue 11).

Each case registers the shared abdominal CT (the fixed image) to a moving image made from it,
once with the library's field-of-view handling (the default) and once without
(``field_of_view=False``: the published behaviour, air outside and every voxel counting), side
by side in one run. Mean Dice over the labels of ``labels_btcv13.nii.gz``, scored on the working
grid (here the CT's own 3 mm grid):

* ``top N air``: the moving image is the CT with its top (superior) N slices set to -1000 HU;
  the labels are unchanged, so the identity is the answer and the initial Dice is 100 %.
* ``10 slices shorter``: the moving image and labels lose their top 10 slices (same header), so
  the fixed image's top slices have no moving data; the initial Dice is below 100 %.
* ``demo pair, affine``: the real-CT demo pair (the CT warped by a known smooth field, 20 mm,
  with an intensity change; :func:`voxelopt.demo.demo_pair`) with and without the default
  affine pre-alignment of ``voxelopt register``.

Usage:
    python benchmarks/bench_fov.py [--features mind] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMMAND = "python benchmarks/bench_fov.py --write"


def _initial_dice(fixed_labels, moving_labels) -> float:
    """Mean Dice of the zero displacement (moving labels padded with 0 onto the fixed grid)."""
    from voxelopt.evaluation import score_registration

    padded = np.zeros(fixed_labels.shape, np.int64)
    m = np.asarray(moving_labels.data)
    padded[: m.shape[0], : m.shape[1], : m.shape[2]] = m
    zero = torch.zeros(1, 3, *fixed_labels.shape)
    fl = torch.from_numpy(np.asarray(fixed_labels.data).astype(np.int64))
    moved = torch.from_numpy(padded)
    return score_registration(zero, fixed_labels=fl, moved_labels=moved).dice_mean


def cases(ct, labels):
    """``(name, moving, moving_labels)`` of the blanked and shortened copies."""
    from voxelopt.io import Volume

    for n in (1, 5, 10):
        data = np.array(ct.data, dtype=np.float32)
        data[:, :, -n:] = -1000.0
        yield f"top {n} slices air", Volume(data, ct.affine, ct.ornt), labels
    short = np.asarray(ct.data)[:, :, :-10]
    short_labels = np.asarray(labels.data)[:, :, :-10]
    yield (
        "10 slices shorter",
        Volume(short, ct.affine, ct.ornt),
        Volume(short_labels, labels.affine, labels.ornt),
    )


def _register(fixed, moving, fl, ml, features, fov, matrix=None) -> tuple[float, float]:
    from voxelopt.pipeline import register_volumes

    start = time.perf_counter()
    out = register_volumes(
        fixed,
        moving,
        fixed_labels=fl,
        moving_labels=ml,
        extractor=features,
        matrix=matrix,
        field_of_view=fov,
    )
    return out.scores.dice_mean, time.perf_counter() - start


def run(features: str) -> list[dict]:
    """One row per case: initial Dice, Dice without and with the field-of-view handling."""
    from voxelopt.affine import align_affine
    from voxelopt.demo import demo_pair
    from voxelopt.io import Volume, load_labels, load_volume
    from voxelopt.paths import abdomen_ct_dir

    folder = abdomen_ct_dir()
    ct, labels = load_volume(folder / "ct.nii.gz"), load_labels(folder / "labels_btcv13.nii.gz")
    rows = []
    for name, moving, moving_labels in cases(ct, labels):
        row = {"case": name, "initial": _initial_dice(labels, moving_labels)}
        for fov in (False, True):
            dice, seconds = _register(ct, moving, labels, moving_labels, features, fov)
            row["with" if fov else "without"], row[f"s_{fov}"] = dice, seconds
        rows.append(row)
        print(row, flush=True)
    pair, like = demo_pair(ct=folder / "ct.nii.gz", ct_labels=folder / "labels_btcv13.nii.gz")

    def vol(x, dtype):
        return Volume(x[0, 0].numpy().astype(dtype), like.affine, like.ornt)

    f, m = vol(pair.fixed_hu, np.float32), vol(pair.moving_hu, np.float32)
    fl, ml = vol(pair.fixed_labels, np.int64), vol(pair.moving_labels, np.int64)
    matrix = align_affine(f, m, mode="affine").matrix
    for label, mat in (("demo pair, no affine", None), ("demo pair, affine", matrix)):
        row = {"case": label, "initial": _initial_dice(fl, ml)}
        for fov in (False, True):
            dice, seconds = _register(f, m, fl, ml, features, fov, mat)
            row["with" if fov else "without"], row[f"s_{fov}"] = dice, seconds
        rows.append(row)
        print(row, flush=True)
    return rows


def table(rows: list[dict], features: str) -> str:
    from voxelopt.tables import format_number, markdown_table

    def pct(v):
        return format_number(v, 1, "f", 100.0)

    body = [
        {
            "case": r["case"],
            "initial": pct(r["initial"]),
            "without": pct(r["without"]),
            "with": pct(r["with"]),
            "seconds": f"{r['s_True']:.1f}",
        }
        for r in rows
    ]
    head = ["case", "initial Dice (%)", "without FOV handling (%)", "with (%)", "time with (s)"]
    return (
        f"```bash\n{COMMAND}\n```\n\nFeatures `{features}`, the CT's own 3 mm grid, mean Dice "
        "over its labels; times are whole `register_volumes` calls on a shared machine.\n\n"
        + markdown_table(body, headers=head)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="mind")
    parser.add_argument("--write", nargs="?", const=str(ROOT / "BENCHMARKS.md"), default=None)
    args = parser.parse_args(argv)
    text = table(run(args.features), args.features)
    print(text)
    if args.write:
        from voxelopt.tables import write_marked_block

        write_marked_block(args.write, "bench_fov", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
