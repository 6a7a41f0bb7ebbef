"""Tests of voxelopt.memory: the per-stage estimate, the available memory, the one-line error."""

from __future__ import annotations

import math
import re

import pytest

from voxelopt.memory import (
    CANDIDATE_SPACINGS,
    COEFFICIENTS,
    MemoryEstimate,
    available_memory_bytes,
    check_memory,
    check_registration_memory,
    estimate_peak_bytes,
    suggest_spacing,
)

CLINICAL = (512, 512, 250)
CLINICAL_MM = (0.8, 0.8, 1.5)
GB = 1e9


def test_estimate_stages_and_peak():
    est = estimate_peak_bytes(CLINICAL, CLINICAL, (140, 140, 128), labels=True)
    assert set(est.stages) == {"load", "resample", "features", "solve", "metrics", "warp", "write"}
    assert est.peak == max(est.stages.values()) == est.stages[est.peak_stage]
    # inputs resident throughout: two float32 images and two int64 label maps
    inputs = COEFFICIENTS["base_bytes"] + 24 * math.prod(CLINICAL)
    assert all(v >= inputs for v in est.stages.values())
    assert est.peak < 4 * GB  # the target for this size with default options


def test_estimate_plain_reference():
    """The solve stage written out by hand from the coefficients."""
    c = COEFFICIENTS
    nf, nw = math.prod((100, 100, 50)), math.prod((50, 50, 25))
    est = estimate_peak_bytes((100, 100, 50), (100, 100, 50), (50, 50, 25), channels=12)
    above = 2 * 4 * nf + (c["solve_per_voxel"] + c["solve_per_channel"] * 12) * nw
    assert est.stages["solve"] == int(c["base_bytes"] + c["fragmentation"] * above)


@pytest.mark.parametrize(
    "shape, working, measured_gb",
    [  # benchmarks/bench_clinical.py, MIND, labels, keep_freed_memory (see BENCHMARKS.md)
        ((512, 512, 250), (139, 139, 128), 3.45),
        ((512, 512, 133), (139, 139, 128), 2.87),
        ((512, 512, 133), (103, 103, 94), 1.90),
        ((512, 512, 133), (173, 173, 133), 3.65),
    ],
)
def test_estimate_within_ten_percent_of_measured_peaks(shape, working, measured_gb):
    est = estimate_peak_bytes(shape, shape, working, labels=True)
    assert abs(est.peak / GB - measured_gb) <= 0.1 * measured_gb


@pytest.mark.parametrize(
    "change, stage",
    [
        ({"working_shape": (200, 200, 200)}, "solve"),
        ({"channels": 12}, "features"),
        ({"channels": 12}, "solve"),
        ({"labels": True}, "load"),
        ({"labels": True}, "warp"),
        ({"levels": 5}, "solve"),
    ],
)
def test_estimate_grows_with_the_work(change, stage):
    small = {"working_shape": (100, 100, 100), "channels": 1, "labels": False, "levels": 1}
    a = estimate_peak_bytes(CLINICAL, CLINICAL, **small)
    b = estimate_peak_bytes(CLINICAL, CLINICAL, **{**small, **change})
    assert b.stages[stage] > a.stages[stage]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fixed_shape": (10, 10)}, "fixed_shape must be 3"),
        ({"working_shape": (0, 10, 10)}, "working_shape must be 3"),
        ({"channels": 0}, "channels"),
        ({"levels": 1.5}, "levels"),
    ],
)
def test_estimate_errors(kwargs, match):
    args = {"fixed_shape": (10,) * 3, "moving_shape": (10,) * 3, "working_shape": (10,) * 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_peak_bytes(**args)


# ---------------------------------------------------------------------- available memory
def _meminfo(tmp_path, kib: int):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 99999999 kB\nMemFree: 1 kB\nMemAvailable: {kib} kB\n")
    return path


def test_available_memory_from_meminfo(tmp_path):
    empty = tmp_path / "nocgroup"
    empty.mkdir()
    assert available_memory_bytes(_meminfo(tmp_path, 2048), empty) == 2048 * 1024


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_available_memory_capped_by_cgroup(tmp_path, version):
    root = tmp_path / "cgroup"
    if version == "v2":
        root.mkdir()
        (root / "memory.max").write_text("3000000\n")
        (root / "memory.current").write_text("1000000\n")
    else:
        (root / "memory").mkdir(parents=True)
        (root / "memory" / "memory.limit_in_bytes").write_text("3000000\n")
        (root / "memory" / "memory.usage_in_bytes").write_text("1000000\n")
    assert available_memory_bytes(_meminfo(tmp_path, 10**6), root) == 2_000_000
    assert available_memory_bytes(_meminfo(tmp_path, 1000), root) == 1_024_000


def test_available_memory_unlimited_cgroup_and_unknown(tmp_path):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "memory.max").write_text("max\n")
    assert available_memory_bytes(_meminfo(tmp_path, 5), root) == 5 * 1024
    assert available_memory_bytes(tmp_path / "absent", root) is None


def test_available_memory_of_this_machine():
    value = available_memory_bytes()
    assert value is None or value > 0


# ---------------------------------------------------------------------------- the check
def test_check_memory_passes_when_it_fits(monkeypatch):
    est = MemoryEstimate({"solve": 10}, 10, "solve")
    check_memory(est, available=10)
    monkeypatch.setattr("voxelopt.memory.available_memory_bytes", lambda: None)
    check_memory(MemoryEstimate({"solve": 10**18}, 10**18, "solve"))  # unknown: no check


def test_check_memory_message_is_one_line_naming_the_option():
    est = MemoryEstimate({"solve": int(9e9)}, int(9e9), "solve")
    with pytest.raises(ValueError) as info:
        check_memory(est, available=int(4e9), fits_with="--spacing 3")
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "registration needs about 9.0 GB of memory (solve stage) but only 4.0 GB is "
        "available; use --spacing 3"
    )
    with pytest.raises(ValueError, match="free memory or use smaller images$"):
        check_memory(est, available=int(4e9))


def test_check_registration_memory_suggests_the_finest_spacing_that_fits():
    available = int(4e9)
    with pytest.raises(ValueError, match=r"use --spacing (\d+(\.\d+)?)$") as info:
        check_registration_memory(
            CLINICAL, CLINICAL_MM, CLINICAL, spacing=0.8, labels=True, available=available
        )
    suggested = float(re.search(r"--spacing (\S+)$", str(info.value)).group(1))
    assert suggested == suggest_spacing(CLINICAL, CLINICAL_MM, CLINICAL, available, labels=True)
    finer = [s for s in CANDIDATE_SPACINGS if s < suggested]
    assert finer  # 0.8 mm itself does not fit
    for s in (finer[-1], suggested):
        fits = (
            check_registration_memory(
                CLINICAL, CLINICAL_MM, CLINICAL, spacing=s, labels=True, available=10**15
            ).peak
            <= available
        )
        assert fits == (s == suggested)


def test_check_registration_memory_default_fits_the_target():
    est = check_registration_memory(
        CLINICAL, CLINICAL_MM, CLINICAL, labels=True, available=int(4e9)
    )
    assert est.peak <= 4e9


def test_check_registration_memory_when_nothing_fits():
    with pytest.raises(ValueError, match="free memory or use smaller images"):
        check_registration_memory(CLINICAL, CLINICAL_MM, CLINICAL, available=int(0.5e9))
