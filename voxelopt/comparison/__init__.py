"""Comparing registration methods on the same pairs with the same scoring (the paper's Table 1).

* :mod:`~voxelopt.comparison.methods`: the rows (VoxelOpt variants, ConvexAdam, VoxelMorph,
  ANTs, elastix) and how each is built;
* :mod:`~voxelopt.comparison.runner`: :func:`run_comparison`, every method on every pair,
  scored by :func:`voxelopt.evaluation.register_and_score`;
* :mod:`~voxelopt.comparison.report`: the Markdown table, per-pair CSV and figure;
* :mod:`~voxelopt.comparison.cli`: ``python compare.py -c configs/compare.yaml``.
"""

from voxelopt.comparison.methods import DEFAULT_METHODS, METHODS, Identity, Resampled
from voxelopt.comparison.report import comparison_table, write_outputs
from voxelopt.comparison.runner import ComparisonResult, MethodResult, run_comparison

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "ComparisonResult",
    "Identity",
    "MethodResult",
    "Resampled",
    "comparison_table",
    "run_comparison",
    "write_outputs",
]
