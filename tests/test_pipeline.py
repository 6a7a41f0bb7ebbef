"""Tests of voxelopt.pipeline (register_volumes) and voxelopt.nifti_stream on a scaled-down
clinical case: a 64 x 64 x 40 phantom with anisotropic voxels, registered on a coarser
working grid through the same code as a 512 x 512 x 250 scan."""

from __future__ import annotations

import gzip
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import voxelopt.nifti_stream as nifti_stream
from voxelopt.affine import compose_affine_and_field
from voxelopt.config import VoxelOptConfig
from voxelopt.evaluation import score_registration
from voxelopt.features import MindSSC
from voxelopt.fullres import upsample_displacement, warp_to_fixed
from voxelopt.grid import grid_of, resample_to_grid, working_grid
from voxelopt.io import (
    Volume,
    displacement_to_file_grid,
    load_labels,
    load_volume,
    save_volume,
)
from voxelopt.nifti_stream import write_displacement, write_nifti_slabs, write_volume
from voxelopt.phantom import make_phantom
from voxelopt.pipeline import STAGES, compact_label_dtype, register_volumes, volume_from_array

ROOT = Path(__file__).resolve().parent.parent
SPACING = (1.5, 1.5, 3.0)
SHAPE = (64, 64, 40)
BUDGET = 20_000  # the working grid: about 27 x 27 x 27 voxels
LEVELS = VoxelOptConfig(levels=3)
# file axis 0 runs left, axis 1 posterior, axis 2 inferior: every axis flipped
FLIPPED = np.array([[-1, 0, 0, 60.0], [0, -1, 0, 50.0], [0, 0, -1, 90.0], [0, 0, 0, 1]], float)


class RecordingExtractor(MindSSC):
    """MIND-SSC that remembers the shapes of the images it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def extract(self, image_hu):
        self.shapes.append(tuple(image_hu.shape[2:]))
        return super().extract(image_hu)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Fixed and moving phantom volumes, written as files with flipped axes and loaded."""
    folder = tmp_path_factory.mktemp("case")
    hu, labels = make_phantom(SHAPE, spacing=SPACING, seed=0)
    affine = FLIPPED @ np.diag([*SPACING, 1.0])
    for name, data in (("image", hu), ("labels", labels.astype(np.int16))):
        nib.save(nib.Nifti1Image(np.asarray(data), affine), str(folder / f"{name}.nii.gz"))
    fixed, fixed_labels = (
        load_volume(folder / "image.nii.gz"),
        load_labels(folder / "labels.nii.gz"),
    )
    return fixed, fixed_labels


@pytest.fixture(scope="module")
def shift():
    """World matrix: the moving image is the fixed one 4.5 mm to the right."""
    m = np.eye(4)
    m[0, 3] = 4.5
    return m


@pytest.fixture(scope="module")
def result(case, shift):
    fixed, labels = case
    extractor = RecordingExtractor()
    events = []
    out = register_volumes(
        fixed,
        fixed,
        fixed_labels=labels,
        moving_labels=labels,
        extractor=extractor,
        config=LEVELS,
        budget_voxels=BUDGET,
        matrix=shift,
        progress=lambda stage, event, info: events.append((stage, event, dict(info))),
    )
    return out, extractor, events


def test_features_never_see_the_full_grid(case, result):
    fixed, _ = case
    out, extractor, _ = result
    assert math.prod(fixed.shape) > 4 * BUDGET
    assert extractor.shapes == [out.working_grid.shape] * 2
    assert math.prod(out.working_grid.shape) <= BUDGET
    assert out.displacement_working.shape == (1, 3, *out.working_grid.shape)
    assert out.entropy.shape == out.working_grid.shape


def test_outputs_at_full_resolution(case, result):
    fixed, labels = case
    out, _, _ = result
    assert out.moved.shape == fixed.shape and out.moved.dtype == np.float32
    assert out.moved_labels.shape == fixed.shape and out.moved_labels.dtype == np.uint8
    assert set(np.unique(out.moved_labels)) <= set(np.unique(labels.data))
    assert out.fixed_grid.shape == fixed.shape
    np.testing.assert_array_equal(out.fixed_grid.affine, fixed.affine)


def test_registration_recovers_the_shift(case, result):
    out, _, _ = result
    u = out.displacement_working[0, 0, 4:-4, 4:-4, 4:-4] * out.working_grid.spacing[0]
    assert abs(float(u.median()) + 4.5) < 1.0  # moving(x + u + 4.5 mm) = fixed(x)
    assert out.metrics["dice"] > 0.8


def test_metrics_on_the_working_grid(case, shift, result):
    fixed, labels = case
    out, _, _ = result
    grid = out.working_grid
    assert out.metrics_grid == {
        "grid": "working",
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing),
    }
    fixed_w = torch.from_numpy(np.ascontiguousarray(resample_to_grid(labels, grid, 0, 0).data))
    # the moving labels sampled once, by nearest neighbour, through the whole map
    # (working voxel x + u(x) -> world -> shift -> label voxel), not resampled twice
    disp = out.displacement_working[0].numpy().astype(np.float64)
    index = np.stack(np.meshgrid(*map(np.arange, grid.shape), indexing="ij")) + disp
    homog = np.concatenate([index.reshape(3, -1), np.ones((1, index[0].size))])
    src = (np.linalg.inv(labels.affine) @ shift @ grid.affine @ homog)[:3]
    near = np.rint(src).astype(np.int64)  # ties to even, as grid_sample's nearest
    inside = np.all((near >= 0) & (near < np.array(labels.shape)[:, None]), axis=0)
    moved = np.zeros(near.shape[1], np.int64)
    moved[inside] = np.asarray(labels.data)[tuple(near[:, inside])]
    # exact half-voxel ties (zero displacement times a 2.625-voxel step) round either way in
    # float32: there the library's own choice stands
    tie = (np.abs(src - np.floor(src) - 0.5) < 1e-6).any(axis=0)
    library = warp_to_fixed(labels, out.displacement_working, grid, grid, 0, 0, shift)
    moved[tie] = library.reshape(-1)[tie]
    ref = score_registration(
        out.displacement_working,
        spacing=grid.spacing,
        fixed_labels=fixed_w,
        moved_labels=torch.from_numpy(moved.reshape(grid.shape)),
    )
    assert out.scores.labels == ref.labels
    assert out.scores.dice == pytest.approx(ref.dice)
    assert out.scores.sdlogj_l2r == pytest.approx(ref.sdlogj_l2r)


def test_progress_events_and_timings(result):
    out, _, events = result
    starts = [s for s, e, _ in events if e == "start"]
    ends = [s for s, e, _ in events if e == "end"]
    assert starts == ends == list(STAGES)
    assert set(out.timings) == set(STAGES) and all(t >= 0 for t in out.timings.values())
    for stage, event, info in events:
        if event == "end":
            assert info["seconds"] == pytest.approx(out.timings[stage])
        if event == "step":
            assert 1 <= info["done"] <= info["total"]
    assert [i["done"] for s, e, i in events if s == "resample" and e == "step"] == [1, 2, 3]
    levels = [i["level"] for s, e, i in events if s == "solve" and e == "step"]
    assert levels == [2, 1, 0]  # each pyramid level as it is solved, coarsest first
    assert out.runtime_s == pytest.approx(out.timings["features"] + out.timings["solve"])


def test_full_resolution_displacement_and_files(case, shift, result, tmp_path):
    fixed, _ = case
    out, _, _ = result
    full = out.displacement()
    assert full.shape == (1, 3, *fixed.shape)
    path = out.write_displacement(tmp_path / "displacement.nii.gz")
    written = nib.load(path)
    np.testing.assert_allclose(
        written.get_fdata(), displacement_to_file_grid(full, fixed), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(written.affine, fixed.file_affine, atol=1e-6)
    working = nib.load(out.write_displacement(tmp_path / "working.nii.gz", grid="working"))
    total = compose_affine_and_field(shift, out.displacement_working, out.working_grid.affine)
    np.testing.assert_allclose(
        working.get_fdata(), displacement_to_file_grid(total, out.working_grid), atol=1e-5
    )
    np.testing.assert_allclose(working.affine, out.working_grid.file_affine, atol=1e-6)
    with pytest.raises(ValueError, match="grid must be"):
        out.write_displacement(tmp_path / "x.nii.gz", grid="file")
    # the moving image is the fixed one seen through the shift: the total field is about 0
    inner = full[0, :, 8:-8, 8:-8, 4:-4]
    assert float(inner.abs().median()) < 0.5
    deformable = out.displacement_working[0, 0, 4:-4, 4:-4, 4:-4] * out.working_grid.spacing[0]
    assert float(deformable.median()) < -3.0  # mm: the deformable part alone undoes the shift


def test_same_grid_no_matrix_is_the_plain_registration(case):
    """Spacing equal to the image's: the working grid is the fixed grid itself."""
    fixed, _ = case
    small = Volume(
        fixed.data[::4, ::4, ::2].copy(), fixed.affine @ np.diag([4, 4, 2, 1.0]), fixed.ornt
    )
    out = register_volumes(small, small, extractor="raw", config=VoxelOptConfig(levels=2))
    assert out.working_grid.shape == small.shape
    assert float(out.displacement_working.abs().max()) == 0.0
    np.testing.assert_allclose(out.moved, small.data, atol=1e-3)
    assert out.moved_labels is None and out.metrics["dice"] is None


def test_register_volumes_errors(case):
    fixed, labels = case
    with pytest.raises(ValueError, match="fixed_labels was given without"):
        register_volumes(fixed, fixed, fixed_labels=labels)
    with pytest.raises(ValueError, match="moving_labels was given without"):
        register_volumes(fixed, fixed, moving_labels=labels)
    other = Volume(labels.data[:-1], labels.affine, labels.ornt)
    with pytest.raises(ValueError, match="different grids"):
        register_volumes(fixed, fixed, fixed_labels=labels, moving_labels=other)
    with pytest.raises(TypeError, match="moving must be"):
        register_volumes(fixed, fixed.data)
    with pytest.raises(ValueError, match="spacing"):
        register_volumes(fixed, fixed, spacing="fine")


@pytest.mark.parametrize(
    "values, dtype",
    [([0, 13], np.uint8), ([0, 300], np.int16), ([-1, 5], np.int16), ([0, 70000], np.int32)],
)
def test_compact_label_dtype(values, dtype):
    assert compact_label_dtype(np.array(values, dtype=np.int64)) == np.dtype(dtype)


# -------------------------------------------------------------------------- nifti_stream
def test_write_volume_equals_save_volume(case, tmp_path, monkeypatch):
    monkeypatch.setattr(nifti_stream, "CHUNK_BYTES", 10_000)  # many deflate chunks
    fixed, labels = case
    for array, dtype in ((fixed.data, np.float32), (labels.data, np.int16)):
        a = nib.load(save_volume(array, fixed, tmp_path / "a.nii.gz", dtype=dtype))
        b = nib.load(write_volume(np.asfortranarray(array), fixed, tmp_path / "b.nii.gz", dtype))
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
        np.testing.assert_allclose(a.affine, b.affine)
        assert b.get_data_dtype() == np.dtype(dtype)
    with gzip.open(tmp_path / "b.nii.gz") as f:  # one valid gzip member, checksum included
        assert len(f.read()) == 352 + 2 * math.prod(fixed.shape)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_displacement_streams_the_fixed_grid_field(case, tmp_path, suffix):
    fixed, _ = case
    grid = working_grid(fixed, 4.0)
    disp = torch.randn((1, 3, *grid.shape), generator=torch.Generator().manual_seed(0))
    path = write_displacement(disp, grid, fixed, tmp_path / f"d{suffix}", threads=2)
    ref = displacement_to_file_grid(upsample_displacement(disp, grid, fixed), fixed)
    np.testing.assert_allclose(nib.load(path).get_fdata(), ref, atol=5e-5, rtol=1e-5)
    m = np.eye(4)
    m[:3, 3] = (3.0, -1.5, 6.0)
    with_matrix = write_displacement(disp, grid, fixed, tmp_path / f"m{suffix}", m)
    ref = displacement_to_file_grid(upsample_displacement(disp, grid, fixed, m), fixed)
    np.testing.assert_allclose(nib.load(with_matrix).get_fdata(), ref, atol=5e-5, rtol=1e-5)
    same = write_displacement(disp, grid, grid, tmp_path / f"w{suffix}")
    np.testing.assert_allclose(
        nib.load(same).get_fdata(), displacement_to_file_grid(disp, grid), atol=1e-6
    )


def test_write_nifti_slabs_errors(tmp_path):
    with pytest.raises(ValueError, match="shape must be"):
        write_nifti_slabs(tmp_path / "x.nii.gz", (2, 2), np.eye(4), np.float32, None)
    with pytest.raises(ValueError, match="slab 0, 0:3"):
        write_nifti_slabs(
            tmp_path / "x.nii.gz", (2, 2, 3), np.eye(4), np.float32, lambda c, a, b: np.zeros(2)
        )
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_grid_of_takes_no_memory(case):
    fixed, _ = case
    g = grid_of(fixed)
    assert g.shape == fixed.shape and g.data.strides == (0, 0, 0)


@pytest.mark.slow
def test_bench_clinical_synthetic(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_clinical.py"),
        "--synthetic",
        "96x96x40",
        "--budget",
        "40000",
        "--features",
        "raw",
        "--json",
        str(tmp_path / "out.json"),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    assert "| **total** |" in out
    for stage in (*STAGES, "load", "write"):
        assert f"| {stage} |" in out


def test_memory_check_stops_before_the_work(case, monkeypatch):
    from voxelopt.memory import estimate_peak_bytes, resident_inputs_bytes

    fixed, labels = case
    resident = resident_inputs_bytes(fixed.shape, fixed.shape, labels=True)

    def needs(spacing: float) -> int:
        grid = working_grid(fixed, spacing)
        est = estimate_peak_bytes(fixed.shape, fixed.shape, grid.shape, levels=3, labels=True)
        return est.after_loading(resident).peak

    available = (needs(1.5) + needs(4.0)) // 2  # the image's own grid does not fit, 4 mm does
    monkeypatch.setattr("voxelopt.memory.available_memory_bytes", lambda *a, **k: available)
    extractor = RecordingExtractor()
    run = {"fixed_labels": labels, "moving_labels": labels, "config": LEVELS, "spacing": 1.5}
    with pytest.raises(ValueError, match=r"is available; use spacing=(2|2\.5|3|4)$"):
        register_volumes(fixed, fixed, extractor=extractor, memory_check=True, **run)
    assert extractor.shapes == []  # stopped before any feature was computed
    monkeypatch.setattr("voxelopt.memory.available_memory_bytes", lambda *a, **k: 1000)
    with pytest.raises(ValueError, match="free memory or use smaller images"):
        register_volumes(fixed, fixed, extractor=extractor, memory_check=True, **run)


def test_volume_from_array():
    vol = volume_from_array(torch.zeros(4, 5, 6), (1.0, 2.0, 3.0))
    assert vol.shape == (4, 5, 6) and vol.spacing == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="array must be"):
        volume_from_array(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        volume_from_array(np.zeros((4, 5, 6)), -1.0)
