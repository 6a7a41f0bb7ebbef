"""``voxelopt register-batch``: many pairs in one process, resumable, Learn2Reg layout.

Usage::

    voxelopt register-batch --dataset AbdomenCTCT/AbdomenCTCT_dataset.json --split val \\
        --out-dir submission/
    voxelopt register-batch --pairs pairs.csv --out-dir results/ --features mind

The pairs come from a Learn2Reg dataset JSON or a CSV (:mod:`voxelopt.batch`). Torch, the
extractor and the solver are loaded once; pairs that share a fixed image run one after the
other and reuse its features (``VoxelOptRegistration(cache_fixed=1)``: one extractor forward
per fixed image) and its loaded volumes. Each pair writes ``OUT/disp_FIXED_MOVING.nii.gz``
(``(X, Y, Z, 3)`` float32 in voxels of the fixed file's grid, ``moved(x) = moving(x + u(x))``,
the affine pre-alignment folded in: Learn2Reg's submission convention) and then its row of
``OUT/pairs.csv`` (the scores of :func:`voxelopt.evaluation.score_registration` on the working
grid, Dice and HD95 where both label maps exist); ``OUT/summary.md`` sums them up at the end.
A tqdm bar counts the pairs on a terminal; otherwise one line per pair (``--quiet``: none).

Resuming: a pair whose row is in pairs.csv and whose field exists is skipped, so running the
same command again after an interruption (Ctrl-C: exit 130, the pairs done so far kept), a
crash or a failed pair registers only what is missing. ``OUT/batch.json`` keeps the options;
a rerun with other options is refused instead of mixing fields.

Failures: a pair that fails (missing or unreadable file, images that do not overlap, ...)
prints one line ``voxelopt: error: pair FIXED_MOVING: ...`` and the others go on; the run
then ends with a line naming the failed pairs and exit code 1.

Beyond one machine: eval.py runs the same registration model over a dataset's pairs on several
GPUs or nodes with Lightning's DDP; the distributed sampler shards the pairs over the ranks and
the scores are gathered (each pair counted once) into ``pairs.csv`` and ``summary.md``::

    python eval.py -c configs/eval_abdomenctct.yaml \\
        --data.init_args.data_dir /data/AbdomenCTCT --model.results_dir results/ \\
        --trainer.accelerator gpu --trainer.strategy ddp --trainer.devices 4 \\
        [--trainer.num_nodes 2]   # started once per node (srun, torchrun set the ranks)

eval.py scores pairs without writing fields. For a Learn2Reg submission from several machines,
split the pairs CSV into one file per machine, run ``register-batch --device cuda`` on each
into its own ``--out-dir`` and put the ``disp_*.nii.gz`` files together.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

from voxelopt.batch import (
    BatchPair,
    BatchResults,
    group_by_fixed,
    pairs_from_csv,
    pairs_from_dataset,
)
from voxelopt.checks import check_world_overlap
from voxelopt.cli import error_line, user_errors
from voxelopt.cli.register import (
    align,
    build_feature_extractor,
    check_options,
    check_working_grid,
    load_labels_for,
    solver_config,
)
from voxelopt.io import load_volume
from voxelopt.outputs import SignalGuard
from voxelopt.pipeline import register_volumes
from voxelopt.progress import Progress

__all__ = ["run_batch"]


def _list_pairs(args: argparse.Namespace) -> list[BatchPair]:
    if args.dataset is not None:
        pairs = pairs_from_dataset(args.dataset, args.split)
    else:
        pairs = pairs_from_csv(args.pairs)
    return pairs[: args.limit] if args.limit else pairs


def _options(args: argparse.Namespace) -> dict:
    """What the fields depend on (kept in batch.json; device and threads are not)."""
    return {
        "features": args.features,
        "weights": None if args.weights is None else str(args.weights),
        "window": list(args.window),
        "affine": args.affine,
        "spacing": args.spacing,
        "config": solver_config(args).to_dict(),
    }


class _PairRunner:
    """Registers pairs with one model, keeping the last fixed image and its labels loaded."""

    def __init__(self, args: argparse.Namespace, model) -> None:
        self.args, self.model = args, model
        self._fixed_key: tuple | None = None
        self._fixed: tuple = ()
        self._quiet = Progress(quiet=True)

    def _fixed_volumes(self, pair: BatchPair):
        key = (pair.fixed, pair.fixed_labels)
        if key != self._fixed_key:
            self._fixed_key, self._fixed = None, ()
            fixed = load_volume(pair.fixed)
            labels = load_labels_for(pair.fixed_labels, fixed, "fixed_labels", "fixed")
            self._fixed_key, self._fixed = key, (fixed, labels)
        return self._fixed

    def register(self, pair: BatchPair, results: BatchResults) -> dict:
        """Register ``pair``, write its field, record its row; the row."""
        args, start = self.args, time.perf_counter()
        fixed, fixed_labels = self._fixed_volumes(pair)
        moving = load_volume(pair.moving)
        moving_labels = load_labels_for(pair.moving_labels, moving, "moving_labels", "moving")
        check_working_grid(args, fixed)
        if args.affine == "none":
            names = ("fixed", "moving")
            check_world_overlap(fixed.affine, fixed.shape, moving.affine, moving.shape, names)
        aligned = align(args.affine, fixed, moving, self._quiet)
        result = register_volumes(
            fixed,
            moving,
            fixed_labels=fixed_labels,
            moving_labels=moving_labels,
            model=self.model,
            spacing=args.spacing,
            matrix=None if aligned is None else aligned.matrix,
            field_of_view=not args.no_fov,
            device=args.device,
            memory_check=True,
        )
        result.write_displacement(results.path(pair), threads=args.threads)
        return results.add(pair, result.scores.row(), time.perf_counter() - start)


def _pair_line(row: dict, done: int, total: int) -> str:
    dice = row.get("dice")
    scores = "" if dice is None or dice != dice else f"Dice {100 * float(dice):.1f} %, "
    return f"pair {done}/{total} {row['pair']}: {scores}{float(row['seconds']):.1f} s"


def _build_model(args: argparse.Namespace):
    from voxelopt.registration import VoxelOptRegistration

    extractor = build_feature_extractor(args)
    extractor.requires_grad_(False)  # inference only: lets the fixed features be cached
    return VoxelOptRegistration(extractor, solver_config(args), cache_fixed=1)


def _register_all(args, todo, results, progress: Progress) -> list[tuple[BatchPair, str]]:
    """Register every pair of ``todo``; the failed ones with their one-line reasons."""
    runner = _PairRunner(args, _build_model(args))
    failures: list[tuple[BatchPair, str]] = []
    bar = tqdm(
        total=len(todo),
        desc="pairs",
        unit="pair",
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    with bar:
        for done, pair in enumerate(group_by_fixed(todo), 1):
            try:
                row = runner.register(pair, results)
            except Exception as exc:
                if os.environ.get("VOXELOPT_DEBUG") and not isinstance(exc, user_errors()):
                    raise
                failures.append((pair, error_line(exc)))
                bar.write(f"voxelopt: error: pair {pair.name}: {failures[-1][1]}", sys.stderr)
            else:
                if bar.disable and not args.quiet:
                    progress.line(_pair_line(row, done, len(todo)))
                bar.set_postfix_str(_pair_line(row, done, len(todo)).split(": ", 1)[1])
            bar.update(1)
    return failures


def run_batch(args: argparse.Namespace, progress: Progress, guard: SignalGuard) -> int:
    """``voxelopt register-batch``; exit code 0, or 1 when some pairs failed."""
    check_options(args)
    pairs = _list_pairs(args)
    results = BatchResults(args.out_dir, _options(args), pairs)
    todo = [p for p in pairs if not results.is_complete(p)]
    progress.line(
        f"{len(pairs)} pairs: {len(pairs) - len(todo)} already complete in {args.out_dir}, "
        f"{len(todo)} to register"
    )
    failures = _register_all(args, todo, results, progress) if todo else []
    summary = results.write_summary(pairs, failures)
    if failures:
        names = ", ".join(p.name for p, _ in failures)
        print(
            f"voxelopt: error: {len(failures)} of {len(todo)} pairs failed ({names}); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    progress.line(f"complete: {len(pairs)} pairs in {args.out_dir} ({summary.name})")
    print(f"{len(pairs)} pairs registered into {args.out_dir}")
    return 0
