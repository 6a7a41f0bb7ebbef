"""Where the project finds the shared data and weights (never copied into the project)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "VOXELOPT_SHARED"


def shared_dir() -> Path:
    """The shared folder: ``$VOXELOPT_SHARED`` if set, else ``<project root>/../shared``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else PROJECT_ROOT.parent / "shared"


def abdomen_ct_dir() -> Path:
    """Folder of the real abdominal CT (ct.nii.gz, labels_btcv13.nii.gz, labels_full104.nii.gz)."""
    return shared_dir() / "data" / "abdomen_ct"


def obelisk_weights() -> Path:
    """Default path of the pretrained OBELISK-hybrid (TCIA) state dict."""
    return shared_dir() / "weights" / "obelisk" / "obeliskhybrid_tcia_fold1.pth"
