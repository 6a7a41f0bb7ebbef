"""Quiet runs: eval.py / train.py print no warnings that are not about the user's input.

The command lines run as subprocesses with the default loggers (CSV + offline W&B) in a fresh
folder, on a tiny synthetic dataset; the helpers of :mod:`models.cli` that silence each
third-party notice are tested one by one, including that they stay narrow.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from torch import nn

from models.cli import _frozen_eval_modules, _prepare_wandb, quiet_third_party

ROOT = Path(__file__).resolve().parents[2]
WARNING_LINE = re.compile(r"warn", re.IGNORECASE)
#: Warning lines a normal run may print: none today. Add a pattern only for a warning about the
#: user's own input (e.g. VoxelOpt's coarse-level warning), never for a library's notice.
ALLOWED: tuple[re.Pattern, ...] = ()
#: The notices this module silences, as they read before (a regression shows them again).
NOTICES = (
    "💡 Tip",
    "litlogger",
    "anonymous setting",
    "git root",
    "LeafSpec",
    "module(s) in eval mode",
)


def tiny_config(tmp_path: Path, files) -> Path:
    """A 16^3 synthetic dataset, a frozen raw-intensity backbone + trainable head, 2 levels."""
    images, labels = files
    extractor = {
        "class_path": "voxelopt.features.HeadedExtractor",
        "init_args": {
            "backbone": {"class_path": "voxelopt.features.RawIntensity"},
            "head": {
                "class_path": "voxelopt.features.FeatureHead",
                "init_args": {"in_channels": 1, "out_channels": 4, "width": 4},
            },
        },
    }
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
        },
        "model": {
            "model": {
                "class_path": "voxelopt.registration.VoxelOptRegistration",
                "init_args": {"extractor": extractor, "config": {"levels": 2, "argmin": "soft"}},
            },
            "loss": {"class_path": "models.losses.LabelDiceLoss"},
            "name": "tiny",
        },
        "data": {
            "class_path": "models.data.SyntheticPairDataModule",
            "init_args": {
                "images": images,
                "labels": labels,
                "downsample": 1,
                "num_train": 2,
                "num_val": 1,
                "num_test": 2,
                "max_displacement_mm": 8.0,
            },
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_quietly(*args: str, cwd: Path) -> str:
    """Run a script as a user does (no WANDB_* set, fresh folder); return stdout + stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.pop("PYTHONWARNINGS", None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def unexpected_warnings(output: str) -> list[str]:
    """Lines that warn or carry a silenced notice, less the allowed ones."""
    lines = [
        line
        for line in output.splitlines()
        if WARNING_LINE.search(line) or any(n in line for n in NOTICES)
    ]
    return [line for line in lines if not any(p.search(line) for p in ALLOWED)]


def test_unexpected_warnings_finds_the_old_notices():
    """The detector itself: each notice of the issue, as it was printed, is caught."""
    before = (
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger\n"
        "wandb: WARNING The anonymous setting has no effect and will be removed\n"
        "wandb: WARNING git root runs does not exist\n"
        "_pytree.py:21: `isinstance(treespec, LeafSpec)` is deprecated, use ...\n"
        "fit_loop.py:538: Found 1 module(s) in eval mode at the start of training.\n"
        "UserWarning: The ``compute`` method of metric RegistrationMetrics was called before\n"
    )
    assert len(unexpected_warnings(before)) == 6
    assert unexpected_warnings("Seed set to 0\n| tiny | 0.8 |\n") == []


@pytest.mark.slow
def test_eval_run_is_quiet(tmp_path, synthetic_files):
    config = tiny_config(tmp_path, synthetic_files)
    out = run_quietly(str(ROOT / "eval.py"), "-c", str(config), cwd=tmp_path)
    assert "| tiny |" in out  # it did run and print its table
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))  # W&B was used
    assert unexpected_warnings(out) == []


@pytest.mark.slow
def test_fit_run_is_quiet(tmp_path, synthetic_files):
    """2 steps and a validation: W&B, the frozen backbone (eval mode), validation metrics."""
    config = tiny_config(tmp_path, synthetic_files)
    out = run_quietly(str(ROOT / "train.py"), "fit", "-c", str(config), cwd=tmp_path)
    assert "val/dice" in (tmp_path / "runs" / "csv" / "version_0" / "metrics.csv").read_text()
    assert unexpected_warnings(out) == []


# ---------------------------------------------------------------- the helpers, one by one
def test_leafspec_filter_is_narrow():
    import torch.utils._pytree as torch_pytree
    from lightning.pytorch.utilities import _pytree as lightning_pytree

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch_pytree.LeafSpec()  # raised here: this test's module
        if not caught:
            pytest.skip("this torch does not deprecate LeafSpec")
        quiet_third_party()
        caught.clear()
        lightning_pytree._tree_flatten(1)  # Lightning's own use: silenced
        assert caught == []
        torch_pytree.LeafSpec()  # anyone else's use still warns
        assert [w.category for w in caught] == [FutureWarning]


def test_lightning_tips_are_dropped_other_records_kept():
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_third_party()
    quiet_third_party()  # idempotent: one filter
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(logger.filters) == len(set(map(id, logger.filters)))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records] == ["GPU available: False, used: False"]


@pytest.mark.parametrize("anonymous", [None, True])
def test_prepare_wandb(tmp_path, anonymous):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    save_dir = tmp_path / "runs"
    logger = WandbLogger(save_dir=str(save_dir), offline=True, anonymous=anonymous)
    _prepare_wandb(logger)
    assert save_dir.is_dir()  # wandb finds it when it looks for the git root
    if anonymous:
        assert logger._wandb_init["anonymous"] == "allow"  # the user's choice is passed on
    else:
        assert "anonymous" not in logger._wandb_init  # nothing wandb would call deprecated


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = True
        self.inner = nn.Conv3d(1, 1, 1)
        self.eval()


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: nn.Sequential(_Frozen(), nn.Conv3d(1, 1, 1)), 2),  # the extractor + its conv
        (lambda: nn.Sequential(nn.Conv3d(1, 1, 1), nn.Dropout()), None),  # all in train mode
        (lambda: nn.Sequential(_Frozen(), nn.Dropout().eval()), None),  # a stray eval module
    ],
)
def test_frozen_eval_modules(build, expected):
    assert _frozen_eval_modules(build()) == expected
