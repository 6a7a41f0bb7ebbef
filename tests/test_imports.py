"""``import voxelopt`` stays light: the heavy optional layers load only where they are used."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("lightning", "torchmetrics", "matplotlib", "scipy", "wandb", "nibabel", "numba")


@pytest.mark.parametrize("module", ["voxelopt", "voxelopt.metrics", "voxelopt.evaluation"])
def test_import_is_light(module):
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loaded {out.stdout.strip()}"


def test_registration_metrics_resolves_lazily():
    from voxelopt.metrics import RegistrationMetrics
    from voxelopt.metrics.aggregate import RegistrationMetrics as direct

    assert RegistrationMetrics is direct
    import voxelopt.metrics

    with pytest.raises(AttributeError, match="no attribute"):
        voxelopt.metrics.does_not_exist  # noqa: B018
