"""The command lines of ``train.py`` and ``eval.py``: a LightningCLI with the project's defaults.

Defaults: :class:`models.registration.RegistrationModule` as the model wrapper, any
:class:`models.data.PairDataModule` subclass as data (``class_path`` in YAML), loggers W&B
(offline unless ``WANDB_MODE=online``; never needs a key) and CSV under ``runs/``, a progress
bar, and a checkpoint of the best validation Dice plus the last one.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from models.data import PairDataModule
from models.registration import RegistrationModule
from voxelopt.allocator import configure_from_environment

__all__ = ["EvalCLI", "LatestCheckpoint", "RegistrationCLI", "trainer_defaults"]

RUNS_DIR = "runs"


def trainer_defaults() -> dict:
    """Trainer defaults: CSV + offline W&B loggers under ``runs/``.

    The CSV logger comes first, so ``trainer.log_dir`` (config, checkpoints, figures, per-pair
    results) is ``runs/csv/version_N``.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # wandb never reaches for the network
    online = os.environ["WANDB_MODE"] == "online"
    return {
        "default_root_dir": RUNS_DIR,
        "log_every_n_steps": 1,
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": RUNS_DIR, "name": "csv"},
            },
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "voxelopt", "save_dir": RUNS_DIR, "offline": not online},
            },
        ],
    }


class LatestCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the weights after the latest epoch, overwritten every epoch.

    Lightning's ``save_last=True`` only copies a checkpoint when a monitored one is saved, so
    with ``monitor="val/dice"`` its "last" was the best epoch's weights.
    """

    def __init__(self, dirpath: str | None = None, every_n_epochs: int = 1) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
        )


class RegistrationCLI(LightningCLI):
    """``RegistrationModule`` + any pair DataModule, with the project's trainer defaults."""

    def __init__(self, **kwargs) -> None:
        configure_from_environment()
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(RegistrationModule, PairDataModule, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Checkpoints: the best validation Dice (``--checkpoint.*``) and the latest epoch
        (``--last_checkpoint.*``, ``last.ckpt``)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")


class EvalCLI(RegistrationCLI):
    """Evaluation: parses the same config plus ``--ckpt_path`` and runs ``trainer.test``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(run=False, **kwargs)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=self.config.ckpt_path)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint whose weights are evaluated (default: the model as configured)",
        )
