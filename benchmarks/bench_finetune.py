"""Fine-tuned feature heads on real data (issue 12): held-out inter-subject and synthetic pairs.

Run from the project root, after training the heads (``train.py fit -c
configs/finetune_real_sup.yaml`` / ``finetune_real_unsup.yaml``) and exporting them:

    python benchmarks/bench_finetune.py --export sup=runs/csv/version_N/checkpoints/best.ckpt \
        --export unsup=runs/csv/version_M/checkpoints/best.ckpt          # -> runs/finetune12/*.pt
    nice -n 15 python benchmarks/bench_finetune.py --heads sup=runs/finetune12/sup.pt \
        unsup=runs/finetune12/unsup.pt --out runs/finetune12 --write

Every row uses the same solver: ``VoxelOptRegistration(extractor, adaptive=False)`` (the
config's ``fixed_sigma`` 0.5, the benchmark's best "fixed" rows), the hard argmin, on a 3 mm
grid. Rows: zero-shot ``mind``, zero-shot ``mind+obelisk`` and each head.

* Inter-subject (never trained on): both directions of ``bench_intersubject.py``
  (``abdomen<-chest``, ``chest<-abdomen``) from our affine through
  :func:`voxelopt.pipeline.register_volumes`, scored by its :func:`intersubject_case.score`
  (organs both scans contain, own field of view).
* Synthetic: fresh seeds (``--seed``, far from the training/validation seeds 0.., 100000..,
  200000..) of the training data's kind (smooth field up to 15 mm, control points 40 mm,
  intensity bias and noise) made from each subject alone, at 3 mm, all 13 organs.

``--write`` puts the tables into BENCHMARKS.md (marked block ``bench_finetune``).
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_k, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from intersubject_case import DIRECTIONS, make_case, score  # noqa: E402
from intersubject_methods import OURS, _StageCpu, _warm_up  # noqa: E402

from voxelopt.tables import markdown_table, write_marked_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ("abdomen_ct", "chest_abdomen_ct")
ZERO_SHOT = ("mind", "mind+obelisk")
HEADING = "Fine-tuned heads on real data (issue 12)"
SYNTH = {"max_displacement_mm": 15.0, "control_spacing_mm": 40.0, "intensity_change": True}


def export_head(ckpt: Path, out: Path, meta: dict | None = None) -> Path:
    """Save the head of a Lightning checkpoint (``model.extractor.head.*``) as ``out`` and
    its description (backbone, head arguments, ``meta``) as ``out`` with ``.json``."""
    import yaml

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "model.extractor.head."
    head = {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}
    if not head:
        raise ValueError(f"ckpt {ckpt} holds no {prefix}* weights")
    cfg_path = ckpt.parent.parent / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    ext = cfg["model"]["model"]["init_args"]["extractor"]["init_args"]
    branches = ext["backbone"]["init_args"].get("names") if "init_args" in ext["backbone"] else None
    backbone = "+".join(branches) if branches else ext["backbone"]["class_path"].split(".")[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head, out)
    desc = {
        "backbone": backbone.lower().replace("mindssc", "mind"),
        "head": ext["head"]["init_args"],
    }
    out.with_suffix(".json").write_text(json.dumps(desc | (meta or {}), indent=1))
    return out


def build_model(method: str):
    """The registration model of a row: a zero-shot name or ``label=path.pt`` of a head."""
    from voxelopt.features import FeatureHead, HeadedExtractor, build_extractor
    from voxelopt.registration import VoxelOptRegistration

    if "=" not in method:
        return VoxelOptRegistration(method, adaptive=False).eval()
    path = Path(method.split("=", 1)[1])
    desc = json.loads(path.with_suffix(".json").read_text())
    head = FeatureHead(**desc["head"])
    head.load_state_dict(torch.load(path, map_location="cpu"))
    ext = HeadedExtractor(build_extractor(desc["backbone"]), head).freeze()
    return VoxelOptRegistration(ext, adaptive=False).eval()


def run_intersubject(case, model) -> dict:
    """One direction from our affine through ``register_volumes``; the own-FOV scores."""
    from voxelopt.affine import compose_affine_and_field
    from voxelopt.pipeline import register_volumes

    _warm_up(model, case.fixed_w, case.moving_affine_w)
    cpu = _StageCpu()
    with torch.no_grad():
        res = register_volumes(
            case.fixed,
            case.moving,
            model=model,
            spacing=case.spacing,
            matrix=case.matrix,
            progress=cpu,
        )
    total = compose_affine_and_field(case.matrix, res.displacement_working, case.grid.affine)
    scores, _ = score(case, total, res.runtime_s)
    return {**scores["own"], "runtime_s": res.runtime_s, "start": OURS}


def synthetic_pairs(count: int, seed: int, spacing: float) -> list[dict]:
    """``count`` fresh pairs per subject (base volume alternating), batched as the loaders."""
    from voxelopt.data import SyntheticPairDataset, prepare_volume
    from voxelopt.io import load_labels, load_volume
    from voxelopt.paths import shared_dir

    volumes = []
    for name in SUBJECTS:
        folder = shared_dir() / "data" / name
        image, label = (
            load_volume(folder / "ct.nii.gz"),
            load_labels(folder / "labels_btcv13.nii.gz"),
        )
        volumes.append(prepare_volume(image, label, 1, None, None, spacing_mm=spacing))
    ds = SyntheticPairDataset(volumes, count * len(SUBJECTS), seed=seed, **SYNTH)
    return [
        {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in ds[i].items()}
        for i in range(len(ds))
    ]


def run_synthetic(batch: dict, model) -> dict:
    from voxelopt.evaluation import register_and_score

    with torch.no_grad():
        res = register_and_score(
            model,
            batch["fixed"],
            batch["moving"],
            spacing=batch["spacing"],
            fixed_labels=batch["fixed_label"],
            moving_labels=batch["moving_label"],
            true_displacement=batch["true_disp"],
            labels=tuple(range(1, 14)),
            argmin="hard",
        )
    return res.scores[0].row()


LABELS = {"sup": "head, label-supervised (Dice)", "unsup": "head, unsupervised (NCC + smoothness)"}


def label_of(method: str) -> str:
    if "=" not in method:
        return f"zero-shot {method}"
    label = method.split("=", 1)[0]
    return LABELS.get(label, label)


def mean_rows(rows: list[dict], group: str) -> list[dict]:
    cols = ("dice", "hd95", "sdlogj_l2r", "sdlogj", "epe_mm", "runtime_s")
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        row = {"method": method, group: ", ".join(str(r[group]) for r in mine)}
        for c in cols:
            vals = [r[c] for r in mine if r.get(c) is not None and r[c] == r[c]]
            row[c] = float(np.mean(vals)) if vals else None
        row["dice"] = None if row["dice"] is None else 100 * row["dice"]
        out.append(row)
    return out


def tables(rows: list[dict]) -> str:
    inter = [r for r in rows if r["set"] == "intersubject"]
    synth = [r for r in rows if r["set"] == "synthetic"]
    cols = ["method", "dice", "hd95", "sdlogj_l2r", "sdlogj", "runtime_s"]
    heads = ["method", "Dice (%)", "HD95 (mm)", "SDlogJ (l2r)", "SDlogJ", "runtime (s)"]
    dirs = [mean_rows([r for r in inter if r["pair"] == d], "pair") for d in DIRECTIONS]
    per_dir = markdown_table(
        [r for rows_d in dirs for r in rows_d], ["pair", *cols], ["pair", *heads]
    )
    text = "Inter-subject (held out), mean of both directions:\n\n"
    text += markdown_table(mean_rows(inter, "pair"), cols, heads)
    text += "\n\nPer direction:\n\n" + per_dir
    text += f"\n\nSynthetic, fresh seeds ({len(synth) // max(1, len({r['method'] for r in synth}))}"
    text += " pairs per row, both subjects), mean:\n\n"
    cols = [*cols[:5], "epe_mm", "runtime_s"]
    return text + markdown_table(mean_rows(synth, "pair"), cols, [*heads[:5], "EPE (mm)", heads[5]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", nargs="+", default=[], metavar="LABEL=CKPT", help="heads to save")
    p.add_argument("--heads", nargs="+", default=[], metavar="LABEL=PT", help="heads to score")
    p.add_argument("--zero-shot", nargs="*", default=list(ZERO_SHOT), help="zero-shot rows")
    p.add_argument("--out", type=Path, default=Path("runs/finetune12"))
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--synthetic", type=int, default=2, help="fresh pairs per subject")
    p.add_argument("--seed", type=int, default=300_000)
    p.add_argument("--sets", nargs="+", default=["intersubject", "synthetic"])
    p.add_argument("--append", action="store_true", help="keep other methods' rows in --out")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--notes", type=Path, default=None, help="Markdown put before the tables")
    p.add_argument("--write", nargs="?", type=Path, const=ROOT / "BENCHMARKS.md", default=None)
    args = p.parse_args(argv)
    args.command = "python benchmarks/bench_finetune.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    return args


def run_all(args: argparse.Namespace, methods: list[str]) -> list[dict]:
    rows = []
    if "intersubject" in args.sets:
        for name in DIRECTIONS:
            case = make_case(name, args.spacing)
            for m in methods:
                row = {"set": "intersubject", "pair": name, "method": label_of(m)}
                rows.append(row | run_intersubject(case, build_model(m)))
                print(
                    json.dumps(
                        {k: rows[-1].get(k) for k in ("pair", "method", "dice", "runtime_s")}
                    ),
                    flush=True,
                )
    if "synthetic" in args.sets:
        for i, batch in enumerate(synthetic_pairs(args.synthetic, args.seed, args.spacing)):
            for m in methods:
                row = {
                    "set": "synthetic",
                    "pair": f"{SUBJECTS[i % 2]}#{args.seed + i}",
                    "method": label_of(m),
                }
                rows.append(row | run_synthetic(batch, build_model(m)))
                print(
                    json.dumps(
                        {k: rows[-1].get(k) for k in ("pair", "method", "dice", "runtime_s")}
                    ),
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for item in args.export:
        label, ckpt = item.split("=", 1)
        print(export_head(Path(ckpt), args.out / f"{label}.pt", {"checkpoint": ckpt}))
    path = args.out / "rows.json"
    rows = (
        json.loads(path.read_text()) if (args.append or args.tables_only) and path.exists() else []
    )
    methods = [*args.zero_shot, *args.heads]
    if not args.tables_only and methods:
        new = run_all(args, methods)
        done = {r["method"] for r in new}
        rows = [r for r in rows if r["method"] not in done] + new
        for r in new:
            r["command"] = args.command
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1, default=float))
    if not rows:
        return 0
    text = tables(rows)
    print(text)
    if args.write is not None:
        cmds = "\n".join(f"    {c}" for c in dict.fromkeys(r.get("command", "") for r in rows))
        notes = args.notes.read_text().strip() + "\n\n" if args.notes else ""
        block = f"## {HEADING}\n\n{notes}Commands of the rows:\n\n{cmds}\n\n{text}\n"
        print("wrote", write_marked_block(args.write, "bench_finetune", block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
