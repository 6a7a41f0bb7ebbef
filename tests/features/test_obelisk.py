"""OBELISK-hybrid: network layout, pre/post-processing of the extractor, real-CT Dice."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from voxelopt.features import ObeliskFeatures, ObeliskHybrid, build_extractor, load_obelisk
from voxelopt.features.obelisk import OBELISK_LAYERS, _anchor_box, body_crop_box


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised state dict in the published layout (no shared folder needed)."""
    path = tmp_path_factory.mktemp("obelisk") / "random.pth"
    torch.manual_seed(0)
    torch.save(ObeliskHybrid().state_dict(), path)
    return path


class _Probe(nn.Module):
    """Stands in for the network: records its input, returns it in 9 channels (+ channel id)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return x * self.scale + torch.arange(9.0).view(1, 9, 1, 1, 1)


class _LayerProbe(nn.Module):
    """Stands in for the network's layers: the input averaged onto the layer's grid."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.layers: list[str] = []

    def forward(self, x, layer="logits"):
        self.layers.append(layer)
        channels, size = OBELISK_LAYERS[layer]
        return F.avg_pool3d(x, 144 // size).expand(-1, channels, -1, -1, -1) * self.scale


def _ramp(shape) -> torch.Tensor:
    """HU that vary linearly along every axis (trilinear resizing keeps them exactly)."""
    d, h, w = (torch.arange(n, dtype=torch.float64) for n in shape)
    hu = 40 * d.view(-1, 1, 1) - 7 * h.view(1, -1, 1) + 3 * w.view(1, 1, -1) - 300
    return hu.float()[None, None]


def test_state_dict_layout():
    sd = ObeliskHybrid().state_dict()
    expected = {
        "offset1": (1, 128, 1, 1, 3),
        "offset2": (1, 512, 1, 1, 3),
        "conv0.weight": (4, 1, 3, 3, 3),
        "linear1a.weight": (128, 64, 1, 1, 1),
        "linear2a.weight": (128, 128, 1, 1, 1),
        "batch1d.running_mean": (224,),
        "linear1e.weight": (16, 224, 1, 1, 1),
        "linear2e.weight": (32, 224, 1, 1, 1),
        "conv6bU.weight": (32, 64, 3, 3, 3),
        "conv6U.weight": (12, 64, 3, 3, 3),
        "conv7U.weight": (9, 16, 3, 3, 3),
        "conv77U.weight": (9, 9, 1, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "grid1" not in sd and "grid2" not in sd
    assert len(sd) == 117


def test_shared_weights_load_strict(obelisk_path):
    net = load_obelisk(obelisk_path)
    assert not net.training
    assert torch.equal(net.offset1, torch.load(obelisk_path, weights_only=True)["offset1"])


def test_network_rejects_other_sizes(random_weights):
    with pytest.raises(ValueError, match="144, 144, 144"):
        load_obelisk(random_weights)(torch.zeros(1, 1, 72, 144, 144))


def test_missing_weights_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="put obeliskhybrid_tcia_fold1.pth there"):
        ObeliskFeatures(weights=tmp_path / "obelisk" / "absent.pth")


def test_default_weights_path_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXELOPT_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "weights" / "obelisk")):
        build_extractor("obelisk")


def test_orientation_and_scaling(random_weights):
    """Input to the net: HU/1024+1 with tensor dims 2 and 4 flipped; output flipped back."""
    ext = ObeliskFeatures(weights=random_weights, crop="none")
    ext.net = _Probe()
    hu = _ramp((144, 144, 144))
    out = ext(hu)
    scaled = hu / 1024 + 1
    torch.testing.assert_close(ext.net.inputs[0], scaled.flip(2, 4))
    torch.testing.assert_close(out, scaled + torch.arange(9.0).view(1, 9, 1, 1, 1))


def test_explicit_crop_resize_and_paste(random_weights):
    box = ((2, 12), (3, 15), (0, 16))
    ext = ObeliskFeatures(weights=random_weights, crop=box)
    ext.net = _Probe()
    hu = _ramp((20, 18, 16))
    out = ext(hu)
    assert out.shape == (1, 9, 20, 18, 16)
    assert ext.net.inputs[0].shape == (1, 1, 144, 144, 144)
    expected = hu[:, :, 2:12, 3:15] / 1024 + 1 + torch.arange(9.0).view(1, 9, 1, 1, 1)
    torch.testing.assert_close(out[:, :, 2:12, 3:15], expected, rtol=1e-5, atol=1e-5)
    # outside the crop: the crop's border replicated
    torch.testing.assert_close(out[:, :, :2], out[:, :, 2:3].expand(-1, -1, 2, -1, -1))
    torch.testing.assert_close(out[:, :, 12:], out[:, :, 11:12].expand(-1, -1, 8, -1, -1))
    torch.testing.assert_close(out[:, :, :, :3], out[:, :, :, 3:4].expand(-1, -1, -1, 3, -1))
    torch.testing.assert_close(out[:, :, :, 15:], out[:, :, :, 14:15].expand(-1, -1, -1, 3, -1))


def test_batch_is_per_volume(random_weights):
    ext = ObeliskFeatures(weights=random_weights, crop="body")
    ext.net = _Probe()
    a = _ramp((10, 12, 8))
    b = torch.full_like(a, -1000.0)
    b[:, :, 2:6, 3:9, 1:5] = 50.0  # a small body in air: its own box
    out = ext(torch.cat([a, b]))
    torch.testing.assert_close(out[1:], ext(b))
    torch.testing.assert_close(out[:1], ext(a))
    assert ext.box_for(b) == ((2, 6), (3, 9), (1, 5))


def test_body_crop_box():
    hu = torch.full((10, 9, 8), -1000.0)
    assert body_crop_box(hu) == ((0, 10), (0, 9), (0, 8))  # no body: whole grid
    hu[3:7, 2:4, 5] = 0.0
    assert body_crop_box(hu) == ((3, 7), (2, 4), (5, 6))
    assert body_crop_box(hu, margin=0.5) == ((1, 9), (1, 5), (5, 6))
    with pytest.raises(ValueError, match="D, H, W"):
        body_crop_box(hu[None])


def test_anchor_box_ignores_scattered_false_positives():
    labels = torch.zeros(40, 30, 30, dtype=torch.long)
    labels[10:20, 5:15, 10:20] = 6  # liver
    labels[12:16, 16:20, 10:14] = 1  # spleen
    labels[0:30, 0:30, 0:5] = 7  # other organs do not count
    labels[38, 28, 28] = 6  # one stray liver voxel
    assert _anchor_box(labels, margin=0.0) == ((10, 20), (5, 20), (10, 20))
    assert _anchor_box(labels, margin=0.2) == ((8, 22), (2, 23), (8, 22))
    assert _anchor_box(torch.zeros(5, 5, 5, dtype=torch.long), 0.1) is None


@pytest.mark.parametrize(
    "crop, match",
    [("organs", "crop must be"), (((0, 4), (0, 4)), "crop box"), (((0, 4), (0, 4), (1,)), "box")],
)
def test_invalid_crop_arguments(random_weights, crop, match):
    with pytest.raises(ValueError, match=match):
        ObeliskFeatures(weights=random_weights, crop=crop)


def test_crop_box_outside_grid(random_weights):
    ext = ObeliskFeatures(weights=random_weights, crop=((0, 30), (0, 4), (0, 4)))
    with pytest.raises(ValueError, match="within the grid"):
        ext(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="margin"):
        ObeliskFeatures(weights=random_weights, margin=1.5)


def test_frozen_by_default(random_weights):
    ext = ObeliskFeatures(weights=random_weights)
    ext.train()
    assert ext.frozen and not ext.net.training
    assert all(not p.requires_grad for p in ext.parameters())
    assert ext.out_channels == 9 and ext.pair_normalize
    free = ObeliskFeatures(weights=random_weights, frozen=False)
    assert all(p.requires_grad for p in free.parameters())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.shared
@pytest.mark.slow
def test_real_ct_dice(ct_dir, obelisk_path):
    """One extraction (automatic organ crop) on the shipped CT against TotalSegmentator."""
    torch.set_num_threads(2)
    ct = nib.as_closest_canonical(nib.load(ct_dir / "ct.nii.gz"))
    labels = np.asarray(
        nib.as_closest_canonical(nib.load(ct_dir / "labels_full104.nii.gz")).dataobj
    )
    hu = torch.from_numpy(np.asarray(ct.dataobj, dtype=np.float32))[None, None]
    ext = ObeliskFeatures(weights=obelisk_path, crop="auto")
    start = time.perf_counter()
    with torch.no_grad():
        logits = ext(hu)
    seconds = time.perf_counter() - start
    assert logits.shape == (1, 9, 122, 101, 112) and torch.isfinite(logits).all()
    pred = logits.argmax(1)[0].numpy()
    liver = _dice(pred == 6, labels == 5)
    spleen = _dice(pred == 1, labels == 1)
    gallbladder = _dice(pred == 4, labels == 4)
    print(f"OBELISK Dice liver {liver:.3f} spleen {spleen:.3f} gallbladder {gallbladder:.3f}")
    print(f"OBELISK extraction {seconds:.1f} s")
    assert liver >= 0.85
    assert spleen >= 0.70
    assert gallbladder >= 0.5


# ----------------------------------------------------------------------------- layers
def _hooked_layers(net: ObeliskHybrid, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: the layers' maps captured by forward hooks during one full forward."""
    seen: dict[str, torch.Tensor] = {}
    names = {"batch6bU": "decoder_coarse", "batch6U": "decoder", "batch7U": "decoder_fine"}
    hooks = [
        getattr(net, module).register_forward_hook(
            lambda _m, _i, out, key=key: seen.__setitem__(key, F.leaky_relu(out, 0.025))
        )
        for module, key in names.items()
    ]
    try:
        seen["logits"] = net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.slow
def test_network_layers_match_a_full_forward(random_weights):
    net = load_obelisk(random_weights)
    x = torch.rand(1, 1, 144, 144, 144, generator=torch.Generator().manual_seed(0)) + 0.5
    with torch.no_grad():
        expected = _hooked_layers(net, x)
        for layer in ("decoder_coarse", "decoder", "decoder_fine"):  # logits: the hooked call
            channels, size = OBELISK_LAYERS[layer]
            got = net(x, layer)
            assert got.shape == (1, channels, size, size, size), layer
            torch.testing.assert_close(got, expected[layer], rtol=0, atol=0)
        # the classifier's input is what it says
        torch.testing.assert_close(net.conv77U(expected["decoder_fine"]), expected["logits"])
    with pytest.raises(ValueError, match="layer must be one of logits, decoder_fine"):
        net(x, "encoder")


@pytest.mark.parametrize("layer", ["decoder", "decoder_coarse", "decoder_fine"])
def test_layer_is_brought_to_the_crop_grid(random_weights, layer):
    """A coarse map is upsampled as the net does, flipped back and resized onto the crop."""
    box = ((2, 12), (3, 15), (0, 16))
    ext = ObeliskFeatures(weights=random_weights, crop=box, layer=layer)
    channels = OBELISK_LAYERS[layer][0]
    assert ext.out_channels == channels and ext.pair_normalize and ext.layer == layer
    ext.net = _LayerProbe()
    hu = _ramp((20, 18, 16))
    out = ext(hu)
    assert out.shape == (1, channels, 20, 18, 16) and ext.net.layers == [layer]
    # a linear ramp survives averaging and the align_corners=False upsampling away from the
    # borders of the 144^3 frame: the interior of the crop gets the scaled HU back
    expected = (hu[:, :, 2:12, 3:15] / 1024 + 1).expand(-1, channels, -1, -1, -1)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(out[:, :, 2:12, 3:15][inner], expected[inner], rtol=0, atol=1e-5)


def test_layer_argument_and_registry_names(random_weights):
    with pytest.raises(ValueError, match="layer must be one of"):
        ObeliskFeatures(weights=random_weights, layer="encoder")
    for name, layer in [
        ("obelisk_decoder", "decoder"),
        ("obelisk_decoder_coarse", "decoder_coarse"),
        ("obelisk_decoder_fine", "decoder_fine"),
    ]:
        ext = build_extractor(name, weights=random_weights)
        assert isinstance(ext, ObeliskFeatures) and ext.layer == layer
        assert ext.out_channels == OBELISK_LAYERS[layer][0]
        assert ext.frozen and all(not p.requires_grad for p in ext.parameters())
    assert build_extractor("obelisk_decoder", weights=random_weights, layer="logits").layer == (
        "logits"
    )


def test_auto_crop_finds_its_box_from_the_logits(random_weights):
    """The first pass of crop="auto" uses the logits whatever layer is extracted."""
    ext = ObeliskFeatures(weights=random_weights, crop="auto", layer="decoder")
    ext.net = _LayerProbe()
    hu = torch.full((1, 1, 12, 10, 8), -1000.0)
    hu[:, :, 2:10, 2:8, 1:7] = 40.0
    ext(hu)
    assert ext.net.layers == ["logits", "decoder"]


@pytest.mark.shared
@pytest.mark.slow
def test_real_decoder_layer_shape_and_determinism(ct_dir, obelisk_path):
    """The decoder maps of the shipped CT: shape, finite, deterministic, not constant."""
    ct = nib.as_closest_canonical(nib.load(ct_dir / "ct.nii.gz"))
    hu = torch.from_numpy(np.asarray(ct.dataobj, dtype=np.float32))[None, None]
    ext = build_extractor("obelisk_decoder", weights=obelisk_path)
    ext.train()  # frozen: stays in eval mode (running BatchNorm statistics)
    assert not ext.net.training
    with torch.no_grad():
        first = ext(hu)
        second = ext(hu)
    assert first.shape == (1, 12, 122, 101, 112) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    spread = first.flatten(2).std(dim=2)[0]
    assert (spread > 0).sum() >= 6  # most of the 12 channels vary over the body
