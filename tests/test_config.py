"""Named solver configurations: :data:`voxelopt.config.PRESETS` and ``--preset``."""

from __future__ import annotations

import dataclasses

import pytest

from voxelopt.cli import build_parser
from voxelopt.cli.parser import PRESET_NAMES
from voxelopt.cli.register import solver_config
from voxelopt.config import PRESETS, VoxelOptConfig

REGISTER = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out-dir", "out"]


def _changed(config: VoxelOptConfig) -> dict:
    """Fields that differ from the defaults (a plain reference for the presets' dicts)."""
    default = VoxelOptConfig()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def test_presets_exist_and_paper_is_the_default():
    assert {"paper", "fixed-sigma"} <= set(PRESETS)
    assert VoxelOptConfig.preset("paper") == VoxelOptConfig()
    assert PRESETS["paper"] == {}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_changes_exactly_its_fields(name):
    config = VoxelOptConfig.preset(name)
    assert _changed(config) == PRESETS[name]


def test_fixed_sigma_preset():
    config = VoxelOptConfig.preset("fixed-sigma")
    assert config.adaptive is False and config.fixed_sigma == 0.8
    assert config.levels == VoxelOptConfig().levels


def test_preset_with_changes_on_top():
    config = VoxelOptConfig.preset("fixed-sigma", levels=4)
    assert (config.levels, config.adaptive, config.fixed_sigma) == (4, False, 0.8)


@pytest.mark.parametrize(
    ("name", "changes", "match"),
    [
        ("nope", {}, "preset must be one of paper, fixed-sigma"),
        ("", {}, "preset must be one of"),
        ("paper", {"levels": 0}, "levels must be"),
        ("paper", {"colour": 1}, "unknown VoxelOptConfig field"),
    ],
)
def test_preset_errors_are_one_line(name, changes, match):
    with pytest.raises(ValueError, match=match) as info:
        VoxelOptConfig.preset(name, **changes)
    assert "\n" not in str(info.value)


def test_parser_names_match_presets():
    assert tuple(PRESETS) == PRESET_NAMES


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], VoxelOptConfig()),
        (["--preset", "paper"], VoxelOptConfig()),
        (["--preset", "fixed-sigma"], VoxelOptConfig(adaptive=False, fixed_sigma=0.8)),
        (
            ["--preset", "fixed-sigma", "--levels", "4"],
            VoxelOptConfig(adaptive=False, fixed_sigma=0.8, levels=4),
        ),
        (["--no-adaptive", "--kernel-size", "2"], VoxelOptConfig(adaptive=False, kernel_size=2)),
    ],
)
def test_cli_preset(extra, expected):
    args = build_parser().parse_args(REGISTER + extra)
    assert solver_config(args) == expected


def test_cli_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*REGISTER, "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
