"""Universal Model backbone + precls head: architecture, checkpoint layout, extractor."""

from __future__ import annotations

import pytest
import torch

from voxelopt.features import (
    UniversalFeatures,
    UniversalNet,
    build_extractor,
    load_universal_checkpoint,
)


@pytest.fixture(scope="module")
def net() -> UniversalNet:
    torch.manual_seed(0)
    model = UniversalNet()
    with torch.no_grad():  # non-trivial affine parameters so a wrong load would show
        for name, p in model.named_parameters():
            if "bn" in name or "precls_conv.0" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _checkpoint(model: UniversalNet) -> dict:
    """The published file layout: {"net": {"module.backbone...", "module.precls_conv..."}}."""
    net = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    net["module.organ_embedding"] = torch.zeros(32, 512)  # other parts of the full model
    return {"net": net, "epoch": 7}


def test_architecture_names_and_shapes(net):
    sd = net.state_dict()
    assert sd["backbone.down_tr64.ops.0.conv1.weight"].shape == (32, 1, 3, 3, 3)
    assert sd["backbone.down_tr512.ops.1.conv1.weight"].shape == (512, 256, 3, 3, 3)
    assert sd["backbone.up_tr256.up_conv.weight"].shape == (512, 512, 2, 2, 2)
    assert sd["backbone.up_tr256.ops.0.conv1.weight"].shape == (256, 768, 3, 3, 3)
    assert sd["backbone.up_tr64.ops.1.bn1.running_var"].shape == (64,)
    assert sd["precls_conv.0.weight"].shape == (64,)
    assert sd["precls_conv.2.weight"].shape == (8, 64, 1, 1, 1)
    names = {k.split(".")[1] for k in sd if k.startswith("backbone.")}
    assert names == {f"down_tr{c}" for c in (64, 128, 256, 512)} | {
        f"up_tr{c}" for c in (64, 128, 256)
    }


def test_batchnorm_uses_batch_statistics(net):
    """Even in eval mode BatchNorm normalises with the batch and leaves its buffers alone."""
    bn = net.backbone.down_tr64.ops[0].bn1
    assert not bn.training
    x = torch.randn(1, 32, 4, 4, 4) * 5 + 3
    mean = x.mean((0, 2, 3, 4), keepdim=True)
    var = x.var((0, 2, 3, 4), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(
        1, -1, 1, 1, 1
    ) + bn.bias.view(1, -1, 1, 1, 1)
    before = bn.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(bn(x), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(bn.running_mean, before)


def test_checkpoint_roundtrip(net, tmp_path):
    path = tmp_path / "universal.pth"
    torch.save(_checkpoint(net), path)
    ext = UniversalFeatures(weights=path)
    for k, v in net.state_dict().items():
        assert torch.equal(ext.net.state_dict()[k], v), k
    hu = torch.randn(1, 1, 16, 16, 16) * 300
    with torch.no_grad():
        expected = net((hu.clamp(-500, 800) + 500) / 1300)
        out = ext(hu)
    assert out.shape == (1, 8, 16, 16, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert ext.out_channels == 8 and ext.pair_normalize and ext.frozen


def test_ignored_keys_reported_and_counter_optional(net):
    ckpt = _checkpoint(net)
    ckpt["net"] = {k: v for k, v in ckpt["net"].items() if "num_batches_tracked" not in k}
    ignored = load_universal_checkpoint(UniversalNet(), ckpt)
    assert ignored == ["module.organ_embedding"]


def test_missing_and_mismatched_keys_listed(net):
    ckpt = _checkpoint(net)
    del ckpt["net"]["module.backbone.up_tr64.ops.1.conv1.bias"]
    del ckpt["net"]["module.precls_conv.2.weight"]
    ckpt["net"]["module.backbone.down_tr64.ops.0.conv1.weight"] = torch.zeros(16, 1, 3, 3, 3)
    ckpt["net"]["module.backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_universal_checkpoint(UniversalNet(), ckpt)
    msg = str(err.value)
    for part in (
        "missing: module.backbone.up_tr64.ops.1.conv1.bias, module.precls_conv.2.weight",
        "module.backbone.down_tr64.ops.0.conv1.weight (16, 1, 3, 3, 3) != (32, 1, 3, 3, 3)",
        "unexpected: module.backbone.extra.weight",
    ):
        assert part in msg


@pytest.mark.parametrize("ckpt", [{"state_dict": {}}, {"net": 3}])
def test_bad_checkpoint_layout(ckpt, tmp_path):
    with pytest.raises(ValueError, match="'net'"):
        load_universal_checkpoint(UniversalNet(), ckpt)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="'net'"):
        load_universal_checkpoint(UniversalNet(), tmp_path / "bad.pth")
    with pytest.raises(TypeError, match="path or a dict"):
        load_universal_checkpoint(UniversalNet(), [1, 2])


def test_missing_file_and_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        UniversalFeatures(weights=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="weights"):
        build_extractor("universal", weights=None)


def test_pads_to_multiple_of_8_and_crops_back(net):
    """An odd grid gives the network's output on the replicate-padded grid, cropped."""
    ext = UniversalFeatures(weights=_checkpoint(net))
    hu = torch.randn(1, 1, 9, 16, 13) * 300
    x = (hu.clamp(-500, 800) + 500) / 1300
    padded = torch.nn.functional.pad(x, (0, 3, 0, 0, 0, 7), mode="replicate")
    with torch.no_grad():
        out = ext(hu)
        expected = net(padded)[:, :, :9, :16, :13]
    assert out.shape == (1, 8, 9, 16, 13)
    torch.testing.assert_close(out, expected)
