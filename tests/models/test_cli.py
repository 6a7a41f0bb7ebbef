"""train.py / eval.py: --print_config, a fit -> checkpoint -> eval round, and DDP evaluation.

The command lines run as subprocesses (as a user runs them) on a tiny synthetic dataset.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, files, num_test: int = 5) -> Path:
    images, labels = files
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
                "init_args": {
                    "extractor": {
                        "class_path": "voxelopt.features.HeadedExtractor",
                        "init_args": {
                            "backbone": {"class_path": "voxelopt.features.RawIntensity"},
                            "head": {
                                "class_path": "voxelopt.features.FeatureHead",
                                "init_args": {"in_channels": 1, "out_channels": 4, "width": 4},
                            },
                        },
                    },
                    "config": {"levels": 2, "argmin": "soft"},
                },
            },
            "loss": {"class_path": "models.losses.LabelDiceLoss"},
            "lr": 0.05,
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
                "num_test": num_test,
                "max_displacement_mm": 8.0,
            },
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as fh:
        return {r["pair"]: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("command", [("train.py", "fit"), ("eval.py",)])
def test_print_config(tmp_path, synthetic_files, command):
    config = write_config(tmp_path, synthetic_files)
    out = run(*command, "-c", str(config), "--model.lr", "0.5", "--print_config", cwd=tmp_path)
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["lr"] == 0.5  # CLI override applied
    assert printed["model"]["model"]["init_args"]["config"]["levels"] == 2
    loggers = {
        lg["class_path"].rsplit(".", 1)[1]: lg["init_args"] for lg in printed["trainer"]["logger"]
    }
    assert loggers["WandbLogger"]["offline"] is True and "CSVLogger" in loggers
    assert printed["checkpoint"]["monitor"] == "val/dice"
    assert "ckpt_path" in printed  # fit's own argument, and eval.py's


@pytest.mark.slow
def test_fit_then_eval_checkpoint(tmp_path, synthetic_files):
    """Default loggers (offline W&B needs no key), checkpoints, then eval of the checkpoint."""
    config = write_config(tmp_path, synthetic_files)
    run("train.py", "fit", "-c", str(config), cwd=tmp_path)
    version = tmp_path / "runs" / "csv" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_file() and (version / "metrics.csv").is_file()
    steps = yaml.safe_load((version / "config.yaml").read_text())["trainer"]["max_steps"]
    assert torch.load(last, weights_only=False)["global_step"] == steps  # the latest weights
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert (version / "figures" / "val_epoch000.png").is_file()
    out = run(
        "eval.py",
        "-c",
        str(config),
        "--ckpt_path",
        str(last),
        "--trainer.logger",
        "false",
        "--model.results_dir",
        "res",
        cwd=tmp_path,
    )
    rows = read_rows(tmp_path / "res" / "pairs.csv")
    assert len(rows) == 5
    assert "| tiny |" in out.stdout + out.stderr  # the summary table is printed


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(tmp_path, synthetic_files):
    """2 CPU processes (gloo) on 5 pairs: the padded repeat is not counted twice."""
    config = write_config(tmp_path, synthetic_files, num_test=5)
    common = ("-c", str(config), "--trainer.logger", "false", "--trainer.accelerator", "cpu")
    run("eval.py", *common, "--model.results_dir", "single", cwd=tmp_path)
    out = run(
        "eval.py",
        *common,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--model.results_dir",
        "ddp",
        cwd=tmp_path,
    )
    assert "distributed_backend=gloo" in out.stdout + out.stderr
    single = read_rows(tmp_path / "single" / "pairs.csv")
    ddp = read_rows(tmp_path / "ddp" / "pairs.csv")
    assert sorted(ddp) == sorted(single) and len(ddp) == 5
    for pair, row in single.items():
        for key, value in row.items():
            if key not in ("pair", "runtime_s"):
                assert ddp[pair][key] == value, (pair, key)
    summary = (tmp_path / "ddp" / "summary.md").read_text().splitlines()[-1]
    assert (
        summary.split("|")[2]
        == (tmp_path / "single" / "summary.md").read_text().splitlines()[-1].split("|")[2]
    )
