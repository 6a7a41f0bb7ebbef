"""Fine-tuning losses: values against hand-computed references, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from models.losses import (
    ImageSimilarityLoss,
    LabelDiceLoss,
    diffusion_regularizer,
    local_ncc,
    one_hot,
    soft_dice,
)


def labels(seed: int, shape=(2, 1, 8, 8, 8), n=3) -> torch.Tensor:
    return torch.randint(0, n + 1, shape, generator=torch.Generator().manual_seed(seed))


def test_soft_dice_matches_hard_dice_on_one_hot():
    a, b = labels(0), labels(1)
    got = soft_dice(one_hot(a, 3), one_hot(b, 3))
    ref = []
    for k in range(2):
        for lab in (1, 2, 3):
            x, y = a[k] == lab, b[k] == lab
            ref.append(2 * (x & y).sum() / (x.sum() + y.sum()))
    torch.testing.assert_close(got, torch.stack(ref).float().mean(), rtol=1e-4, atol=1e-5)


def test_one_hot_shape_and_out_of_range():
    lab = torch.tensor([0, 1, 2, 7, -1]).view(1, 1, 5, 1, 1)
    oh = one_hot(lab, 2)
    assert oh.shape == (1, 3, 5, 1, 1)
    assert oh[0, :, :, 0, 0].argmax(0).tolist() == [0, 1, 2, 0, 0]
    with pytest.raises(ValueError, match="label must have shape"):
        one_hot(lab[0], 2)


def test_label_dice_loss_zero_for_identity():
    lab = labels(2)
    batch = {"fixed_label": lab, "moving_label": lab}
    loss, parts = LabelDiceLoss(num_labels=3)(batch, torch.zeros(2, 3, 8, 8, 8))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert parts["soft_dice"].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="fixed_label"):
        LabelDiceLoss()({"moving_label": lab}, torch.zeros(2, 3, 8, 8, 8))


def test_diffusion_regularizer_reference():
    disp = torch.zeros(1, 3, 4, 5, 6)
    assert diffusion_regularizer(disp).item() == 0.0
    disp[:, 0] = torch.arange(4.0).view(4, 1, 1) * 0.5  # d u_0 / d x_0 = 0.5 everywhere
    assert diffusion_regularizer(disp).item() == pytest.approx(0.25)
    disp[:, 0] = 7.0  # constant fields are free
    assert diffusion_regularizer(disp).item() == 0.0


def test_local_ncc_invariant_to_affine_intensity():
    a = torch.rand(1, 1, 10, 10, 10, generator=torch.Generator().manual_seed(0))
    assert local_ncc(a, 3 * a - 1).item() == pytest.approx(1.0, abs=1e-3)
    b = torch.rand(1, 1, 10, 10, 10, generator=torch.Generator().manual_seed(1))
    assert local_ncc(a, b).item() < 0.3
    with pytest.raises(ValueError, match="window"):
        local_ncc(a, b, window=4)


@pytest.mark.parametrize("similarity", ["ncc", "mse"])
def test_image_loss_prefers_the_true_field(similarity):
    """The loss of the true field is lower than that of no motion, and has gradients."""
    from voxelopt.phantom import make_phantom, random_smooth_displacement
    from voxelopt.transform import warp

    hu, _ = make_phantom((16, 16, 16), spacing=12.0)
    moving = torch.as_tensor(hu)[None, None]
    true = random_smooth_displacement((16, 16, 16), 2.0, control_spacing=8.0, seed=3)
    batch = {"fixed": warp(moving, true, padding_mode="border"), "moving": moving}
    loss = ImageSimilarityLoss(similarity, smoothness=0.0, ncc_window=3)
    disp = torch.zeros_like(true, requires_grad=True)
    zero_loss, _ = loss(batch, disp)
    zero_loss.backward()
    assert disp.grad.abs().sum() > 0
    true_loss, parts = loss(batch, true)
    assert true_loss < zero_loss and similarity in parts


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ImageSimilarityLoss("ssd"), "similarity"),
        (lambda: ImageSimilarityLoss(window_hu=(100.0, -100.0)), "window_hu"),
        (lambda: LabelDiceLoss(num_labels=0), "num_labels"),
        (lambda: LabelDiceLoss(smoothness=-1.0), "smoothness"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
