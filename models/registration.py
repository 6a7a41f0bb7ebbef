"""``RegistrationModule``: evaluate any registration model, or fine-tune its feature heads.

A registration model is any ``nn.Module`` with ``forward(fixed_hu, moving_hu) ->
displacement`` (``(B, 1, D, H, W)`` HU in, ``(B, 3, D, H, W)`` voxels out), e.g.
:class:`voxelopt.registration.VoxelOptRegistration` or a baseline; in YAML it is a
``class_path``/``init_args`` block, so models swap without code.

* Zero-shot evaluation: ``validation_step``/``test_step`` register each pair and score it with
  :class:`voxelopt.metrics.RegistrationMetrics` (Dice, HD95, SDlogJ, folding, endpoint error
  for synthetic pairs, runtime). The metric state is keyed by pair name, so under DDP a pair
  repeated by the distributed sampler is counted once. At the end of testing the per-pair CSV
  and a Markdown summary are written and the table is printed.
* Fine-tuning: ``training_step`` runs the model with the soft argmin (``train_argmin``),
  which makes the solver differentiable, and minimises a :mod:`models.losses` loss; only the
  parameters that require gradients (trainable feature heads) are optimised. Evaluation of the
  fine-tuned model uses ``eval_argmin`` (hard by default, as published).
* Each validation epoch saves a figure of the first pair (fixed, moving, moved, entropy) as a
  PNG in ``<log_dir>/figures`` and logs it to W&B / TensorBoard when those loggers are used.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from models.losses import RegistrationLoss
from voxelopt.evaluation import SUMMARY_COLUMNS, register_and_score
from voxelopt.metrics.aggregate import RegistrationMetrics
from voxelopt.registration import ArgminMode, argmin_mode
from voxelopt.tables import markdown_table, summary_rows, write_csv, write_text
from voxelopt.transform import warp

__all__ = ["RegistrationModule"]


class RegistrationModule(pl.LightningModule):
    """Lightning wrapper of a registration model for evaluation and end-to-end fine-tuning.

    Args:
        model: registration model, ``forward(fixed_hu, moving_hu) -> (B, 3, D, H, W)``.
        loss: fine-tuning loss (``None``: evaluation only; ``fit`` then raises).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        train_argmin: argmin of every :class:`voxelopt.VoxelOpt` inside ``model`` during
            training (``"soft"``: differentiable; ``None`` keeps the model's setting).
        eval_argmin: argmin during validation, test and predict (``"hard"`` as published;
            ``None`` keeps the model's setting).
        num_labels: organ labels ``1..num_labels`` scored (13 for the paper's dataset).
        name: method name in the summary table.
        results_dir: where ``test`` writes ``pairs.csv`` and ``summary.md`` (default: the
            trainer's log directory).
        figures: save/log a figure of the first validation pair every validation epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: RegistrationLoss | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        train_argmin: ArgminMode | None = "soft",
        eval_argmin: ArgminMode | None = "hard",
        num_labels: int = 13,
        name: str = "model",
        results_dir: str | None = None,
        figures: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss is not None and not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be an nn.Module or None, got {type(loss).__name__}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        for arg, mode in (("train_argmin", train_argmin), ("eval_argmin", eval_argmin)):
            if mode not in (None, "hard", "soft"):
                raise ValueError(f"{arg} must be 'hard', 'soft' or None, got {mode!r}")
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
        # model and loss are rebuilt from the config (LightningCLI) or passed again to
        # load_from_checkpoint; their weights travel in the state dict.
        self.save_hyperparameters(ignore=["model", "loss"])
        self.model = model
        self.loss = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_argmin = train_argmin
        self.eval_argmin = eval_argmin
        self.name = name
        self.results_dir = results_dir
        self.figures = figures
        labels = tuple(range(1, num_labels + 1))
        self.val_metrics = RegistrationMetrics(labels=labels)
        self.test_metrics = RegistrationMetrics(labels=labels)

    # ------------------------------------------------------------------ registration
    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU pair -> ``(B, 3, D, H, W)`` displacement in voxels."""
        return self.model(fixed_hu, moving_hu)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.loss is None:
            raise ValueError("RegistrationModule.loss is None: set a loss to fine-tune")
        with argmin_mode(self.model, self.train_argmin):
            disp = self(batch["fixed"], batch["moving"])
        loss, parts = self.loss(batch, disp)
        size = disp.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for key, value in parts.items():
            self.log(f"train/{key}", value, batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "the model has no trainable parameters; wrap its extractor in a "
                "voxelopt.features.HeadedExtractor to fine-tune"
            )
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict, metrics: RegistrationMetrics, with_entropy: bool):
        """Register and score a batch; returns the displacement and the entropy map."""
        result = register_and_score(
            self.model,
            batch["fixed"],
            batch["moving"],
            spacing=batch["spacing"],
            fixed_labels=batch["fixed_label"],
            moving_labels=batch["moving_label"],
            true_displacement=batch.get("true_disp"),
            labels=metrics.labels,
            argmin=self.eval_argmin,
            with_entropy=with_entropy,
        )
        for pair, scores in zip(batch["pair"], result.scores, strict=True):
            metrics.add(pair, scores)
        return result.displacement, result.entropy

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        want_figure = (
            self.figures
            and batch_idx == 0
            and not self.trainer.sanity_checking
            and self.trainer.is_global_zero
        )
        disp, entropy = self._evaluate(batch, self.val_metrics, want_figure)
        if want_figure:
            self._save_figure(batch, disp, entropy)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, False)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        with argmin_mode(self.model, self.eval_argmin):
            disp = self(batch["fixed"], batch["moving"])
        return {"pair": batch["pair"], "displacement": disp.cpu()}

    def _log_summary(self, stage: str, summary: dict[str, float]) -> None:
        values = {
            f"{stage}/{key}": summary[key]
            for key in (*SUMMARY_COLUMNS, "num_pairs")
            if key in summary and summary[key] == summary[key]  # drop nan
        }
        # the summary is already gathered over ranks: identical everywhere, no reduction
        dice = values.pop(f"{stage}/dice", None)
        self.log_dict(values, prog_bar=False, sync_dist=False)
        if dice is not None:
            self.log(f"{stage}/dice", dice, prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", self.val_metrics.compute())
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        summary = self.test_metrics.compute()
        with self.test_metrics.sync_context(should_sync=True):
            rows = self.test_metrics.rows()
        self.test_metrics.reset()
        self._log_summary("test", summary)
        if self.trainer.is_global_zero and rows:
            self._write_results(rows, summary)

    # ------------------------------------------------------------------ outputs
    def _output_dir(self) -> Path:
        trainer = self.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write_results(self, rows: list[dict], summary: dict[str, float]) -> None:
        out = Path(self.results_dir) if self.results_dir else self._output_dir()
        out.mkdir(parents=True, exist_ok=True)
        rows = sorted(rows, key=lambda r: str(r["pair"]))
        csv_path = write_csv(rows, out / "pairs.csv")
        table = markdown_table(summary_rows({self.name: summary}, SUMMARY_COLUMNS))
        write_text(table, out / "summary.md")
        per_pair = markdown_table(
            rows, ["pair", "dice", "hd95", "sdlogj_l2r", "epe_mm", "runtime_s"]
        )
        rank_zero_info(f"\n{len(rows)} pairs; per pair: {csv_path}\n{table}\n{per_pair}")

    def _save_figure(self, batch: dict, disp: Tensor, entropy: Tensor | None) -> None:
        from voxelopt.visualize import save_registration_figure

        moved = warp(batch["moving"][:1], disp[:1], padding_mode="border")
        moved_labels = warp(batch["moving_label"][:1], disp[:1], mode="nearest")
        path = self._output_dir() / "figures" / f"val_epoch{self.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_registration_figure(
            path,
            fixed=batch["fixed"][0, 0],
            moving=batch["moving"][0, 0],
            moved=moved[0, 0],
            entropy=None if entropy is None else entropy[0, 0],
            fixed_labels=batch["fixed_label"][0, 0],
            moving_labels=batch["moving_label"][0, 0],
            moved_labels=moved_labels[0, 0],
            spacing=tuple(float(s) for s in batch["spacing"][0]),
            title=f"{self.name}: pair {batch['pair'][0]}, epoch {self.current_epoch}",
        )
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/figure", images=[str(path)], step=self.global_step)
            elif isinstance(logger, TensorBoardLogger):
                import matplotlib.image

                image = matplotlib.image.imread(str(path))
                logger.experiment.add_image(
                    "val/figure", image[..., :3], self.global_step, dataformats="HWC"
                )
