"""Heads on combined backbones (head after the pair step) and heads shipped as files."""

from __future__ import annotations

import json

import pytest
import torch

from voxelopt.features import (
    CombinedExtractor,
    FeatureHead,
    HeadedExtractor,
    MindSSC,
    RawIntensity,
    normalize_pair,
)
from voxelopt.features.heads import PretrainedHead, shipped_heads


def _trained_head(channels: int, seed: int = 0) -> FeatureHead:
    torch.manual_seed(seed)
    head = FeatureHead(channels, channels, width=4, depth=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


def _pair(shape=(12, 11, 10)):
    torch.manual_seed(1)
    return (torch.rand(1, 1, *shape) * 1500 - 1000, torch.rand(1, 1, *shape) * 1500 - 1000)


@pytest.mark.parametrize("weights, balance", [((1.0, 1.0), True), ((2.0, 0.5), False)])
def test_head_runs_after_the_combined_pair_step(weights, balance):
    backbone = CombinedExtractor([MindSSC(), RawIntensity()], weights, balance=balance)
    head = _trained_head(13)
    ext = HeadedExtractor(backbone, head)
    assert ext.head_after_pair
    fixed, moving = _pair()
    got = ext.extract_pair(fixed, moving)
    # reference: each branch prepared alone, scaled, concatenated; then the head
    parts_f, parts_m = [], []
    for branch, scale in zip(backbone.branches, backbone.scales, strict=True):
        f, m = branch.prepare_pair(branch(fixed), branch(moving))
        parts_f.append(f * scale)
        parts_m.append(m * scale)
    with torch.no_grad():
        want = (head(torch.cat(parts_f, 1)), head(torch.cat(parts_m, 1)))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    # forward alone gives the raw backbone features (cachable for a fixed image)
    torch.testing.assert_close(ext(fixed), backbone(fixed))


def test_head_on_a_plain_backbone_unchanged():
    head = _trained_head(12)
    ext = HeadedExtractor(MindSSC(), head, pair_normalize=True)
    assert not ext.head_after_pair
    fixed, moving = _pair()
    with torch.no_grad():
        ref = normalize_pair(head(MindSSC()(fixed)), head(MindSSC()(moving)))
    got = ext.extract_pair(fixed, moving)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_pretrained_head_loads_its_file(tmp_path):
    head = _trained_head(12, seed=3)
    torch.save(head.state_dict(), tmp_path / "h.pt")
    desc = {"backbone": "mind", "head": {"in_channels": 12, "out_channels": 12, "width": 4}}
    (tmp_path / "h.json").write_text(json.dumps(desc))
    ext = PretrainedHead(path=tmp_path / "h.pt")
    assert ext.frozen and ext.name == "h"
    assert not any(p.requires_grad for p in ext.parameters())
    fixed, _ = _pair()
    with torch.no_grad():
        torch.testing.assert_close(ext(fixed), head(MindSSC()(fixed)))


def test_pretrained_head_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PretrainedHead(name="no_such_head")
    torch.save(_trained_head(12).state_dict(), tmp_path / "h.pt")
    with pytest.raises(FileNotFoundError, match="h.json"):
        PretrainedHead(path=tmp_path / "h.pt")


@pytest.mark.parametrize("name", shipped_heads())
def test_shipped_head_registers_and_runs(name, obelisk_path):
    from voxelopt.features import available_extractors, build_extractor
    from voxelopt.registration import VoxelOptRegistration

    assert name in available_extractors()
    ext = build_extractor(name)
    assert isinstance(ext, PretrainedHead) and ext.frozen
    desc = ext.description
    assert {"backbone", "head", "command", "config"} <= set(desc)
    fixed, moving = _pair((24, 24, 24))
    with torch.no_grad():
        f, m = ext.extract_pair(fixed, moving)
        disp = VoxelOptRegistration(ext, levels=2, adaptive=False)(fixed, moving)
    assert f.shape == m.shape == (1, ext.out_channels, 24, 24, 24)
    assert torch.isfinite(f).all() and disp.shape == (1, 3, 24, 24, 24)
