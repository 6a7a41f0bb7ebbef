"""RegistrationModule: gradients through the solver, a training step, checkpoints, scoring."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from models.data import SyntheticPairDataModule
from models.losses import ImageSimilarityLoss, LabelDiceLoss
from models.registration import RegistrationModule
from voxelopt.config import VoxelOptConfig
from voxelopt.features import FeatureHead, HeadedExtractor, RawIntensity
from voxelopt.metrics import dice, mean_over_labels
from voxelopt.registration import VoxelOptRegistration, argmin_mode
from voxelopt.transform import warp


def headed_model(seed: int = 0) -> VoxelOptRegistration:
    torch.manual_seed(seed)
    extractor = HeadedExtractor(RawIntensity(), FeatureHead(1, 4, width=4, depth=2))
    return VoxelOptRegistration(extractor, VoxelOptConfig(levels=2, argmin="soft"))


@pytest.fixture
def datamodule(synthetic_files):
    images, labels = synthetic_files
    dm = SyntheticPairDataModule(
        images, labels, downsample=1, num_train=2, num_val=2, num_test=3, max_displacement_mm=8.0
    )
    dm.setup()
    return dm


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(**options)


@pytest.mark.parametrize(
    "loss", [LabelDiceLoss(num_labels=13), ImageSimilarityLoss("ncc", ncc_window=3)]
)
def test_gradients_reach_head_through_soft_solver(datamodule, loss):
    module = RegistrationModule(headed_model(), loss)
    batch = next(iter(datamodule.train_dataloader()))
    value = module.training_step(batch, 0)
    value.backward()
    head = module.model.extractor.head
    # the residual branch starts at zero, so its last layer and the projection get gradients
    assert head.proj.weight.grad.abs().sum() > 0
    assert head.residual[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.model.extractor.backbone.parameters())


def test_argmin_switch_and_restore(datamodule):
    module = RegistrationModule(headed_model(), LabelDiceLoss(), eval_argmin="hard")
    with argmin_mode(module.model, "hard"):
        assert module.model.solver.config.argmin == "hard"
    assert module.model.solver.config.argmin == "soft"
    batch = datamodule.datasets["val"][0]
    batch = {k: v[None] if torch.is_tensor(v) else [v] for k, v in batch.items()}
    module.eval()
    with torch.no_grad():
        disp, _ = module._evaluate(batch, module.val_metrics, False)
        hard = headed_model()
        hard.solver.config = hard.solver.config.replace(argmin="hard")
        torch.testing.assert_close(disp, hard(batch["fixed"], batch["moving"]))
        assert not torch.allclose(disp, module(batch["fixed"], batch["moving"]))


def test_training_step_checkpoint_roundtrip(tmp_path, datamodule):
    module = RegistrationModule(headed_model(), LabelDiceLoss(), lr=0.05)
    before = [p.detach().clone() for p in module.model.extractor.head.parameters()]
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    tr.fit(module, datamodule)
    after = list(module.model.extractor.head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert torch.isfinite(tr.callback_metrics["train/loss"])

    path = tmp_path / "model.ckpt"
    tr.save_checkpoint(path)
    restored = RegistrationModule.load_from_checkpoint(
        path, model=headed_model(seed=1), loss=LabelDiceLoss()
    )
    assert restored.lr == 0.05
    batch = next(iter(datamodule.test_dataloader()))
    module.eval()
    restored.eval()
    with torch.no_grad(), argmin_mode(module.model, "hard"), argmin_mode(restored.model, "hard"):
        expected = module(batch["fixed"], batch["moving"])
        torch.testing.assert_close(restored(batch["fixed"], batch["moving"]), expected)
        fresh = headed_model(seed=1)
        fresh.extractor.head.residual[-1].weight.data.normal_()
        assert not torch.allclose(fresh(batch["fixed"], batch["moving"]), expected)


def test_test_loop_scores_every_pair_and_writes_results(tmp_path, datamodule):
    module = RegistrationModule(headed_model(), name="tiny", results_dir=str(tmp_path / "res"))
    results = trainer(tmp_path).test(module, datamodule)[0]
    assert results["test/num_pairs"] == 3
    with open(tmp_path / "res" / "pairs.csv") as fh:
        rows = {r["pair"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["syn200000", "syn200001", "syn200002"]
    assert "| tiny |" in (tmp_path / "res" / "summary.md").read_text()
    # reference: the first pair scored by hand with the hard solver
    sample = datamodule.datasets["test"][0]
    model = headed_model()
    model.solver.config = model.solver.config.replace(argmin="hard")
    with torch.no_grad():
        disp = model(sample["fixed"][None], sample["moving"][None])
    moved = warp(sample["moving_label"][None], disp, mode="nearest")
    expected = mean_over_labels(dice(moved[0, 0], sample["fixed_label"][0], range(1, 14)))
    assert float(rows["syn200000"]["dice"]) == pytest.approx(expected, abs=1e-6)
    mean = sum(float(r["dice"]) for r in rows.values()) / 3
    assert results["test/dice"] == pytest.approx(mean, abs=1e-5)
    assert float(rows["syn200000"]["epe_mm"]) > 0


def test_validation_figure_saved(tmp_path, datamodule):
    module = RegistrationModule(headed_model())
    tr = trainer(tmp_path)
    tr.validate(module, datamodule)
    assert (tmp_path / "figures" / "val_epoch000.png").stat().st_size > 1000
    assert 0 <= tr.callback_metrics["val/dice"] <= 1


class NoParams(nn.Module):
    def forward(self, fixed, moving):
        return torch.zeros(fixed.shape[0], 3, *fixed.shape[2:])


def test_errors(tmp_path, datamodule):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        RegistrationModule("mind")
    with pytest.raises(ValueError, match="eval_argmin"):
        RegistrationModule(NoParams(), eval_argmin="soft-ish")
    with pytest.raises(ValueError, match="num_labels"):
        RegistrationModule(NoParams(), num_labels=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer(tmp_path, max_steps=1).fit(
            RegistrationModule(NoParams(), LabelDiceLoss()), datamodule
        )
    with pytest.raises(ValueError, match="loss is None"):
        trainer(tmp_path, max_steps=1).fit(RegistrationModule(headed_model()), datamodule)
