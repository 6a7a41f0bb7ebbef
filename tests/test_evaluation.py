"""Tests of voxelopt.evaluation: the one scoring function and the timer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from voxelopt.evaluation import SUMMARY_COLUMNS, score_columns, score_registration, timed
from voxelopt.metrics import dice, hd95, mean_over_labels, nonpositive_jacobian_fraction, sdlogj
from voxelopt.transform import warp


def _pair(seed: int, shape=(12, 10, 8)):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.randint(0, 4, shape, generator=g)
    moving = torch.randint(0, 4, shape, generator=g)
    disp = torch.randn(1, 3, *shape, generator=g, dtype=torch.float64) * 0.7
    return fixed, moving, disp


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spacing", [1.0, (1.0, 2.0, 3.0)])
def test_scores_match_the_metric_functions(seed, spacing):
    fixed, moving, disp = _pair(seed)
    scores = score_registration(
        disp, spacing=spacing, fixed_labels=fixed, moving_labels=moving, runtime_s=0.5
    )
    moved = warp(moving[None, None], disp, mode="nearest")[0, 0]  # plain reference
    d, h = dice(moved, fixed), hd95(moved, fixed, spacing)
    assert scores.labels == (1, 2, 3)
    assert scores.dice == pytest.approx(d) and scores.hd95 == pytest.approx(h)
    assert scores.dice_mean == pytest.approx(mean_over_labels(d))
    assert scores.sdlogj_l2r == pytest.approx(float(sdlogj(disp)[0]))
    assert scores.sdlogj == pytest.approx(float(sdlogj(disp, "plain")[0]))
    assert scores.nonpositive_jacobian == pytest.approx(
        float(nonpositive_jacobian_fraction(disp)[0])
    )
    assert scores.runtime_s == 0.5 and math.isnan(scores.epe_mm)
    assert list(scores.row()) == score_columns((1, 2, 3))
    # already warped labels give the same scores
    again = score_registration(disp, spacing=spacing, fixed_labels=fixed, moved_labels=moved)
    assert again.dice == scores.dice


def test_endpoint_error_inside_mask():
    disp = torch.zeros(1, 3, 4, 4, 4)
    true = torch.zeros_like(disp)
    true[:, 0, :2] = 2.0
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:2] = True
    assert score_registration(disp, true_displacement=true).epe_mm == pytest.approx(1.0)
    inside = score_registration(disp, spacing=3.0, true_displacement=true, mask=mask)
    assert inside.epe_mm == pytest.approx(6.0)


def test_json_is_strict_and_says_why():
    disp = torch.zeros(1, 3, 6, 6, 6)
    labels = torch.zeros(6, 6, 6, dtype=torch.long)
    labels[:2] = 1
    moving = torch.zeros_like(labels)  # label 1 missing from the moving map: HD95 undefined
    scores = score_registration(disp, fixed_labels=labels, moving_labels=moving)
    out = scores.to_json()
    json.dumps(out, allow_nan=False)  # raises on NaN or Infinity
    assert out["hd95"] is None and out["epe_mm"] is None and out["dice"] == 0.0
    assert "only one map" in out["undefined"]["hd95_per_label_mm"]
    assert set(SUMMARY_COLUMNS) <= set(out)
    no_labels = score_registration(disp).to_json()
    assert no_labels["dice"] is None and "label maps" in no_labels["undefined"]["dice"]


def test_explicit_labels_keep_absent_ones_as_nan():
    fixed, moving, disp = _pair(3)
    scores = score_registration(disp, fixed_labels=fixed, moving_labels=moving, labels=[1, 2, 3, 9])
    assert math.isnan(scores.dice[9]) and not math.isnan(scores.dice_mean)


def test_errors():
    fixed, moving, disp = _pair(4)
    with pytest.raises(ValueError, match="one pair"):
        score_registration(torch.zeros(2, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="not both"):
        score_registration(disp, fixed_labels=fixed, moving_labels=moving, moved_labels=moving)
    with pytest.raises(ValueError, match="spacing"):
        score_registration(disp, spacing=-1.0)
    with pytest.raises(ValueError, match="differ"):
        score_registration(disp, fixed_labels=fixed, moved_labels=moving[:4])
    with pytest.raises(ValueError, match="displacement"):
        score_registration(torch.zeros(1, 2, 4, 4, 4))


def test_timed():
    result, seconds = timed(lambda: np.arange(3).sum(), "cpu")
    assert result == 3 and 0 <= seconds < 1
