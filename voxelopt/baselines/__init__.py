"""Baseline registration methods, each a *registration model*.

A registration model maps ``fixed_hu, moving_hu: (B, 1, D, H, W)`` Hounsfield units (RAS+
arrays) to a displacement ``(B, 3, D, H, W)`` in voxels of the fixed grid with
``moved(x) = moving(x + u(x))`` (see :mod:`voxelopt.transform`).

* :mod:`voxelopt.baselines.convex_adam`: ConvexAdam (coupled convex discrete optimisation on
  MIND-SSC features followed by Adam instance optimisation), pure torch.
* :mod:`voxelopt.baselines.voxelmorph`: a VoxelMorph-style 3D U-Net predicting a stationary
  velocity field.
* :mod:`voxelopt.baselines.ants` / :mod:`voxelopt.baselines.elastix`: adapters for ANTs SyN and
  elastix B-spline (optional extras: ``pip install -e ".[peers]"``), imported lazily.
* :mod:`voxelopt.baselines.itk_space`: RAS voxel arrays <-> ITK (LPS) physical space, shared by
  the two adapters.
"""

from voxelopt.baselines.convex_adam import ConvexAdam, ConvexAdamConfig
from voxelopt.baselines.voxelmorph import VoxelMorph

__all__ = ["ConvexAdam", "ConvexAdamConfig", "VoxelMorph"]
