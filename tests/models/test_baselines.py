"""VoxelMorph training glue: the semi-supervised loss and training through RegistrationModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.losses import ImageSimilarityLoss, LabelDiceLoss, SemiSupervisedLoss
from models.registration import RegistrationModule
from voxelopt.baselines.voxelmorph import VoxelMorph

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(encoder=(4, 4), decoder=(4, 4, 4))


def _batch(shape=(8, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (1, 1, *shape), generator=g)
    return {
        "fixed": labels.float() * 100 + torch.rand(1, 1, *shape, generator=g) * 20,
        "moving": labels.roll(1, 2).float() * 100,
        "fixed_label": labels,
        "moving_label": labels.roll(1, 2),
        "pair": ["p0"],
        "spacing": torch.tensor([[2.0, 2.0, 2.0]]),
    }


@pytest.mark.parametrize("similarity", ["ncc", "mse"])
@pytest.mark.parametrize("dice_weight", [0.0, 0.5, 2.0])
def test_loss_is_image_term_plus_weighted_dice(similarity, dice_weight):
    batch = _batch()
    disp = 0.3 * torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = SemiSupervisedLoss(similarity, ncc_window=3, dice_weight=dice_weight, smoothness=0.0)
    total, parts = loss(batch, disp)
    image, _ = ImageSimilarityLoss(similarity, ncc_window=3, smoothness=0.0)(batch, disp)
    labels, _ = LabelDiceLoss(13)(batch, disp)
    torch.testing.assert_close(total, image + dice_weight * labels)
    assert {"image_term", "label_term", "soft_dice"} <= set(parts)


def test_loss_rejects_negative_dice_weight():
    with pytest.raises(ValueError, match="dice_weight"):
        SemiSupervisedLoss(dice_weight=-1.0)


def test_registration_module_trains_voxelmorph():
    torch.manual_seed(0)
    module = RegistrationModule(
        VoxelMorph(init_std=1e-2, **TINY),
        SemiSupervisedLoss(ncc_window=3, smoothness=0.1),
        lr=1e-2,
        train_argmin=None,
        eval_argmin=None,
        figures=False,
    )
    optimiser = module.configure_optimizers()
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert len(optimiser.param_groups[0]["params"]) == len(trainable) > 0
    before = [p.detach().clone() for p in trainable]
    batch = _batch()
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(batch, 0)
    loss.backward()
    optimiser.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


@pytest.mark.parametrize("name", ["baseline_voxelmorph_unsup", "baseline_voxelmorph_semisup"])
def test_configs_build_voxelmorph_and_its_loss(name):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RegistrationModule, "model")
    parser.add_argument("--seed_everything", type=int)
    parser.add_argument("--trainer", type=dict)
    parser.add_argument("--data", type=dict)
    cfg = parser.parse_path(str(CONFIGS / f"{name}.yaml"))
    module = parser.instantiate_classes(cfg).model
    assert isinstance(module.model, VoxelMorph) and module.model.integration_steps == 7
    expected = SemiSupervisedLoss if name.endswith("semisup") else ImageSimilarityLoss
    assert type(module.loss) is expected
    out = module(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16)
