"""Tests of the comparison (voxelopt/comparison/, compare.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from voxelopt.baselines.itk_space import INSTALL_HINT
from voxelopt.baselines.voxelmorph import VoxelMorph
from voxelopt.comparison import (
    METHODS,
    Identity,
    Resampled,
    comparison_table,
    run_comparison,
    write_outputs,
)
from voxelopt.comparison.cli import main
from voxelopt.data import make_pairs

TINY_PAIRS = dict(source="phantom", seeds=[0], phantom_shape=[24, 20, 28], phantom_spacing=12.0)
TINY_VXM = dict(encoder=[4, 4], decoder=[4, 4, 4])


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(**TINY_PAIRS)


def test_identity_is_zero():
    x = torch.rand(2, 1, 4, 5, 6)
    assert torch.equal(Identity()(x, x), torch.zeros(2, 3, 4, 5, 6))


def test_pairs_follow_the_warping_convention(pairs):
    (p,) = pairs
    assert p.fixed_hu.shape == p.moving_hu.shape == (1, 1, 24, 20, 28)
    assert p.true_disp.shape == (1, 3, 24, 20, 28) and p.spacing == (12.0, 12.0, 12.0)
    assert p.name == "phantom_seed0" and p.affine[0, 0] == 12.0


def test_command_writes_table_figure_and_lists_the_skipped(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "--methods=[initial, voxelopt_mind, voxelmorph]",
        "--source=phantom",
        "--seeds=[0]",
        "--phantom_shape=[24, 20, 28]",
        "--phantom_spacing=12",
        f"--output_dir={out}",
        "--device=cpu",
    ]
    assert main(argv) == 0
    table = (out / "compare.md").read_text()
    assert "| Initial | - |" in table and "| VoxelOpt (MIND) |" in table
    assert "Skipped:" in table and "VoxelMorph: no checkpoint given" in table
    assert "| VoxelMorph |" not in table
    assert (out / "compare.png").stat().st_size > 10_000
    csv = (out / "pairs.csv").read_text().splitlines()
    assert csv[0].startswith("method,pair,") and len(csv) == 3  # header + 2 methods x 1 pair
    assert "VoxelOpt (MIND)" in capsys.readouterr().out


def test_scores_come_from_the_metrics(pairs):
    result = run_comparison(["initial"], pairs, device="cpu", log=lambda s: None)
    (initial,) = result.methods
    assert initial.summary["sdlogj_l2r"] < 1e-5 and initial.summary["nonpositive_jacobian"] == 0
    # the identity's endpoint error is the true field's mean magnitude in mm inside the body
    body = pairs[0].fixed_hu[:, 0] > -500
    assert 0 < body.float().mean() < 1
    true_mm = (pairs[0].true_disp * 12.0).norm(dim=1)[body].mean()
    assert initial.summary["epe_mm"] == pytest.approx(float(true_mm), rel=1e-4)
    assert 0 < initial.summary["dice"] < 1


def test_missing_package_is_skipped_with_the_reason(pairs, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ants", None)
    result = run_comparison(["initial", "ants"], pairs, device="cpu", log=lambda s: None)
    assert INSTALL_HINT in result.methods[1].skipped
    paths = write_outputs(result, tmp_path)
    assert "- ANTs SyN: " in paths["markdown"].read_text()


def _voxelmorph_checkpoint(tmp_path):
    """A tiny VoxelMorph saved as a RegistrationModule checkpoint (``model.`` prefix)."""
    model = VoxelMorph(**TINY_VXM)
    ckpt = tmp_path / "vxm.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return ckpt


def test_voxelmorph_checkpoint_of_a_registration_module(pairs, tmp_path):
    ckpt = _voxelmorph_checkpoint(tmp_path)
    result = run_comparison(
        ["voxelmorph"],
        pairs,
        options={"voxelmorph": TINY_VXM},
        voxelmorph_ckpt=str(ckpt),
        device="cpu",
        log=lambda s: None,
    )
    (vxm,) = result.methods
    assert vxm.skipped is None and len(vxm.rows) == 1
    assert "| VoxelMorph | learning |" in comparison_table(result)


def test_voxelmorph_runs_at_its_training_resolution(pairs, tmp_path):
    ckpt = _voxelmorph_checkpoint(tmp_path)
    result = run_comparison(
        ["voxelmorph"],
        pairs,
        options={"voxelmorph": {**TINY_VXM, "input_downsample": 2}},
        voxelmorph_ckpt=str(ckpt),
        device="cpu",
        log=lambda s: None,
    )
    assert result.methods[0].skipped is None and len(result.methods[0].rows) == 1


def test_resampled_returns_the_field_on_the_input_grid():
    class Shift(torch.nn.Module):  # one voxel of the coarse grid along every axis
        def forward(self, fixed, moving):
            return fixed.new_ones(fixed.shape[0], 3, *fixed.shape[2:])

    x = torch.rand(1, 1, 17, 9, 13)
    disp = Resampled(Shift(), 2)(x, x)
    assert disp.shape == (1, 3, 17, 9, 13)
    # 1 voxel of the coarse grid (9, 5, 7) = ceil(n / 2) is (n - 1) / (m - 1) = 2 input voxels
    expected = torch.tensor([16 / 8, 8 / 4, 12 / 6])
    assert torch.allclose(disp[0, :, 0, 0, 0], expected, atol=1e-5)
    assert torch.equal(Resampled(Shift(), 1)(x, x), torch.ones(1, 3, 17, 9, 13))
    with pytest.raises(ValueError, match="input_downsample"):
        Resampled(Shift(), 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods=[initial, deeds]"],
        ["--source=phantom", "--seeds=[]"],
    ],
)
def test_bad_input_exits_with_code_2(argv, tmp_path, capsys):
    assert main([*argv, f"--output_dir={tmp_path}"]) == 2
    assert "compare.py: error:" in capsys.readouterr().err


def test_every_method_has_a_row_description():
    assert set(METHODS) >= {"initial", "convex_adam", "voxelmorph", "ants", "elastix"}
    assert all(spec.label and spec.kind for spec in METHODS.values())
