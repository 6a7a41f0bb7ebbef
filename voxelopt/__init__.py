"""VoxelOpt: voxel-adaptive message passing for discrete optimisation in deformable registration.

See ``docs/ARCHITECTURE.md`` for the data's way through the modules and the conventions
(tensors ``(B, C, D, H, W)``, displacements ``(B, 3, D, H, W)`` in voxels, channel ``i`` along
spatial axis ``i``, ``moved(x) = moving(x + u(x))``).

Example:
    >>> import torch
    >>> from voxelopt import VoxelOpt
    >>> fixed, moving = torch.rand(1, 8, 32, 32, 32), torch.rand(1, 8, 32, 32, 32)
    >>> VoxelOpt()(fixed, moving).shape
    torch.Size([1, 3, 32, 32, 32])
"""

from __future__ import annotations

import importlib

# Loaded on first access (PEP 562), so that `voxelopt --help` and other light entry points
# do not import torch (about 1.3 s).
_LAZY = {
    "RegistrationResult": "voxelopt.registration",
    "VoxelOpt": "voxelopt.pyramid",
    "VoxelOptConfig": "voxelopt.config",
    "VoxelOptRegistration": "voxelopt.registration",
    "VoxelOptResult": "voxelopt.pyramid",
    "register": "voxelopt.registration",
}

__all__ = [
    "RegistrationResult",
    "VoxelOpt",
    "VoxelOptConfig",
    "VoxelOptRegistration",
    "VoxelOptResult",
    "register",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'voxelopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
