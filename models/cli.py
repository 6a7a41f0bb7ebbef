"""The command lines of ``train.py`` and ``eval.py``: a LightningCLI with the project's defaults.

Defaults: :class:`models.registration.RegistrationModule` as the model wrapper, any
:class:`models.data.PairDataModule` subclass as data (``class_path`` in YAML), loggers W&B
(offline unless ``WANDB_MODE=online``; never needs a key) and CSV under ``runs/``, a progress
bar, and a checkpoint of the best validation Dice plus the last one.

Runs are quiet: the third-party notices that say nothing about the user's input (Lightning's
litlogger/litmodels tips, wandb's anonymous-setting and missing-git-root warnings, a torch
deprecation raised inside Lightning, the eval-mode warning for frozen feature extractors) are
silenced at their source, each by its exact message; every other warning still shows.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from models.data import PairDataModule
from models.registration import RegistrationModule
from voxelopt.allocator import configure_from_environment

__all__ = [
    "EvalCLI",
    "LatestCheckpoint",
    "RegistrationCLI",
    "quiet_third_party",
    "trainer_defaults",
]

RUNS_DIR = "runs"


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger/litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_TIP_FILTER = _DropLightningTips()


def quiet_third_party() -> None:
    """Silence the third-party notices that are not about the user's input, each by message.

    * Lightning's "💡 Tip" records (litlogger, litmodels) on its rank-zero loggers.
    * torch's FutureWarning about ``isinstance(treespec, LeafSpec)``, only where Lightning's
      ``utilities._pytree`` raises it (Lightning's own code, not fixable by the user).

    Idempotent; warnings and records with any other message are untouched.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def _prepare_wandb(logger: WandbLogger) -> None:
    """Keep wandb from warning about what the user never set.

    Lightning passes ``anonymous=None`` to ``wandb.init`` when anonymous logging is not asked
    for, which wandb >= 0.19 reports as a deprecated setting; and wandb looks for a git root
    in ``save_dir`` before creating it ("git root runs does not exist"). An explicit
    ``anonymous=True`` is passed on unchanged.
    """
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", "unset") is None:
        del init["anonymous"]
    if logger.save_dir:
        os.makedirs(logger.save_dir, exist_ok=True)


def _frozen_eval_modules(model) -> int | None:
    """How many modules are in eval mode, if all of them lie inside frozen feature extractors.

    Returns:
        The count, or ``None`` when some module outside a frozen extractor is in eval mode
        (then Lightning's warning is left to speak).
    """
    modules = dict(model.named_modules())
    frozen = [n for n, m in modules.items() if getattr(m, "frozen", False) is True]
    in_eval = [n for n, m in modules.items() if not m.training]
    inside = [n for n in in_eval if any(n == f or n.startswith(f + ".") for f in frozen)]
    return len(in_eval) if in_eval and len(inside) == len(in_eval) else None


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
        quiet_third_party()
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

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Lightning trainer, with its W&B loggers prepared (see :func:`_prepare_wandb`)."""
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _prepare_wandb(logger)
        return trainer

    def before_fit(self) -> None:
        """Frozen feature extractors stay in eval mode by design: Lightning's "Found N
        module(s) in eval mode" warning is silenced for exactly that N, and only then."""
        count = _frozen_eval_modules(self.model)
        if count is not None:
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {count} module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
            )


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
