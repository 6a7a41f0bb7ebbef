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

from voxelopt.config import VoxelOptConfig
from voxelopt.pyramid import VoxelOpt, VoxelOptResult
from voxelopt.registration import RegistrationResult, VoxelOptRegistration, register

__all__ = [
    "RegistrationResult",
    "VoxelOpt",
    "VoxelOptConfig",
    "VoxelOptRegistration",
    "VoxelOptResult",
    "register",
]
__version__ = "0.1.0"
