"""`voxelopt register` and `voxelopt demo` end to end, and every bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from voxelopt.cli import main
from voxelopt.phantom import make_pair, make_phantom

SHAPE = (40, 36, 40)
FAST = ["--levels", "3", "--features", "raw", "--quiet"]
OUTPUTS = {"moved.nii.gz", "displacement.nii.gz", "report.json", "registration.png"}


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A phantom pair written with an LPS, anisotropic affine (not the identity)."""
    folder = tmp_path_factory.mktemp("pair")
    hu, labels = make_phantom(SHAPE, spacing=(4.0, 4.0, 4.0), seed=0)
    pair = make_pair(hu, labels, max_displacement_mm=12.0, spacing=4.0, seed=1)
    affine = np.array([[-4.0, 0, 0, 90.0], [0, -4.0, 0, 60.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1]])
    files = {}
    for name, data, dtype in [
        ("fixed", pair.fixed_hu, np.float32),
        ("moving", pair.moving_hu, np.float32),
        ("fixed_labels", pair.fixed_labels, np.int16),
        ("moving_labels", pair.moving_labels, np.int16),
    ]:
        # canonical (RAS) array -> LPS file axes: flip the first two axes
        array = np.asarray(data[0, 0]).astype(dtype)[::-1, ::-1, :]
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), path)
        files[name] = path
    files["affine"] = affine
    return files


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def register_args(files, out_dir, labels=True):
    args = [
        "register",
        "--fixed",
        files["fixed"],
        "--moving",
        files["moving"],
        "--out-dir",
        out_dir,
    ]
    if labels:
        args += ["--fixed-labels", files["fixed_labels"], "--moving-labels", files["moving_labels"]]
    return args + FAST


class TestRegister:
    def test_outputs_and_affine(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        code, stdout, _ = run(register_args(pair_files, out), capsys)
        assert code == 0
        assert {p.name for p in out.iterdir()} == OUTPUTS | {"moved_labels.nii.gz"}
        fixed = nib.load(pair_files["fixed"])
        for name in ("moved.nii.gz", "moved_labels.nii.gz"):
            img = nib.load(out / name)
            assert img.shape == fixed.shape
            np.testing.assert_allclose(img.affine, pair_files["affine"])
        disp = nib.load(out / "displacement.nii.gz")
        assert disp.shape == (*fixed.shape, 3)
        np.testing.assert_allclose(disp.affine, pair_files["affine"])
        report = json.loads((out / "report.json").read_text())
        assert report["runtime_s"] > 0
        m = report["metrics"]
        assert {"dice", "dice_mean", "hd95_mm", "hd95_mean_mm", "sdlogj"} <= set(m)
        assert "nonpositive_jacobian_fraction" in m
        assert "Dice" in stdout
        assert (out / "registration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_registration_improves_overlap(self, pair_files, tmp_path, capsys):
        out = tmp_path / "out"
        assert run(register_args(pair_files, out), capsys)[0] == 0
        fixed_labels = nib.load(pair_files["fixed_labels"]).get_fdata()
        moving_labels = nib.load(pair_files["moving_labels"]).get_fdata()
        moved_labels = nib.load(out / "moved_labels.nii.gz").get_fdata()

        def overlap(a, b):
            return np.mean(
                [
                    2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
                    for k in np.unique(b)
                    if k > 0
                ]
            )

        assert overlap(moved_labels, fixed_labels) > overlap(moving_labels, fixed_labels) + 0.04

    def test_displacement_file_convention(self, pair_files, tmp_path, capsys):
        """Warping the moving file by the written field (file axes) gives moved.nii.gz."""
        from scipy.ndimage import map_coordinates

        out = tmp_path / "out"
        assert run(register_args(pair_files, out, labels=False), capsys)[0] == 0
        moving = nib.load(pair_files["moving"]).get_fdata()
        disp = nib.load(out / "displacement.nii.gz").get_fdata()
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in moving.shape], indexing="ij"))
        coords = grid + np.moveaxis(disp, -1, 0)
        resampled = map_coordinates(moving, coords, order=1, mode="nearest")
        moved = nib.load(out / "moved.nii.gz").get_fdata()
        inner = (slice(2, -2),) * 3
        np.testing.assert_allclose(resampled[inner], moved[inner], atol=1.0)

    def test_moving_on_other_grid_is_resampled(self, pair_files, tmp_path, capsys):
        img = nib.load(pair_files["moving"])
        shifted = img.affine.copy()
        shifted[:3, 3] += 8.0  # a different grid of the same scanner space
        other = tmp_path / "moving_other.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), other)
        out = tmp_path / "out"
        args = ["register", "--fixed", pair_files["fixed"], "--moving", other, "--out-dir", out]
        assert run(args + FAST, capsys)[0] == 0
        report = json.loads((out / "report.json").read_text())
        assert report["inputs"]["moving_resampled_to_fixed_grid"] is True
        assert nib.load(out / "moved.nii.gz").shape == nib.load(pair_files["fixed"]).shape


def _bad_file(tmp_path, kind, pair_files):
    affine = pair_files["affine"]
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "four_d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), affine), path)
    elif kind == "nan":
        data = np.asarray(nib.load(pair_files["moving"]).dataobj).copy()
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, affine), path)
    elif kind == "not_nifti":
        path.write_bytes(b"this is not a NIfTI file")
    elif kind == "small_labels":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine), path)
    return path


class TestBadInput:
    @pytest.mark.parametrize(
        "change, match",
        [
            (lambda a, t, f: a.__setitem__(2, t / "missing.nii.gz"), "missing.nii.gz"),
            (lambda a, t, f: a.__setitem__(4, _bad_file(t, "four_d", f)), "3"),
            (lambda a, t, f: a.__setitem__(4, _bad_file(t, "nan", f)), "NaN"),
            (lambda a, t, f: a.__setitem__(4, _bad_file(t, "not_nifti", f)), "not_nifti"),
            (lambda a, t, f: a.__setitem__(10, _bad_file(t, "small_labels", f)), "labels"),
            (lambda a, t, f: a.extend(["--window", "800", "-500"]), "window"),
            (lambda a, t, f: a.extend(["--weights", t / "none.pth"]), "weights"),
            (lambda a, t, f: a.extend(["--features", "universal"]), "--weights"),
        ],
        ids=["missing", "4d", "nan", "not-nifti", "label-grid", "window", "weights", "universal"],
    )
    def test_one_line_error_exit_2_nothing_written(
        self, pair_files, tmp_path, capsys, change, match
    ):
        out = tmp_path / "out"
        args = register_args(pair_files, out)
        change(args, tmp_path, pair_files)
        code, stdout, stderr = run(args, capsys)
        assert code == 2
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("voxelopt: error:")
        assert match.lower() in lines[0].lower()
        assert not out.exists() or not any(out.iterdir())

    @pytest.mark.parametrize(
        "extra", [["--levels", "0"], ["--features", "sift"], ["--device", "tpu"], ["--argmin", "x"]]
    )
    def test_out_of_range_options(self, pair_files, tmp_path, capsys, extra):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in register_args(pair_files, out) + extra])
        assert exc.value.code == 2
        assert not out.exists()

    def test_cuda_unavailable(self, pair_files, tmp_path, capsys):
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        out = tmp_path / "out"
        code, _, stderr = run(register_args(pair_files, out) + ["--device", "cuda"], capsys)
        assert code == 2 and "cuda" in stderr.lower()
        assert not out.exists() or not any(out.iterdir())


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, stderr = run(
        ["demo", "--out-dir", out, "--shape", "40", "40", "40", "--levels", "3"], capsys
    )
    assert code == 0
    assert OUTPUTS | {"moved_labels.nii.gz", "inputs"} == {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["metrics"]["dice_mean"] <= 1
    assert "initial Dice" in stderr


@pytest.mark.slow
def test_demo_from_real_ct(ct_dir, tmp_path, capsys):
    out = tmp_path / "demo_ct"
    args = ["demo", "--ct", ct_dir / "ct.nii.gz", "--ct-labels", ct_dir / "labels_btcv13.nii.gz"]
    code, _, stderr = run(args + ["--out-dir", out, "--features", "raw", "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    initial = float(stderr.split("initial Dice ")[1].split(" %")[0]) / 100
    assert report["metrics"]["dice_mean"] > initial + 0.05
    assert nib.load(out / "moved.nii.gz").shape == nib.load(ct_dir / "ct.nii.gz").shape


def test_demo_labels_without_ct(tmp_path, capsys):
    code, _, stderr = run(["demo", "--out-dir", tmp_path / "d", "--ct-labels", "x.nii.gz"], capsys)
    assert code == 2 and "--ct-labels needs --ct" in stderr


def test_register_with_universal_checkpoint(pair_files, tmp_path, capsys):
    """`--features universal --weights PATH` reads a checkpoint in the published layout."""
    import torch

    from voxelopt.features import UniversalNet

    torch.manual_seed(0)
    net = UniversalNet()
    # the published layout: {"net": {"module.backbone.<...>", "module.precls_conv.<i>..."}}
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    assert all(k.startswith(("module.backbone.", "module.precls_conv.")) for k in state)
    path = tmp_path / "universal.pth"
    torch.save({"net": state}, path)
    out = tmp_path / "out"
    args = register_args(pair_files, out, labels=False)
    args[args.index("raw")] = "universal"
    code, _, stderr = run(args + ["--weights", path], capsys)
    assert code == 0, stderr
    assert json.loads((out / "report.json").read_text())["features"] == "universal"
