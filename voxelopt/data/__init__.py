"""The data layer, without Lightning: pairs, datasets on disk, volumes on the working grid.

* :mod:`~voxelopt.data.pair`: :class:`Pair`, the one pair type (and its dataset sample);
* :mod:`~voxelopt.data.subjects`: the 30-scan dataset in the paper or Learn2Reg layout, with
  every file checked up front;
* :mod:`~voxelopt.data.volumes`: the one meaning of ``downsample``, subjects as tensors, the
  shared real CT;
* :mod:`~voxelopt.data.datasets`: torch ``Dataset`` s of real and synthetic pairs;
* :mod:`~voxelopt.data.synthetic`: synthetic pairs of the shared CT or the phantom.

``models/data.py`` wraps these in LightningDataModules.
"""

from voxelopt.data.datasets import PairDataset, SyntheticPairDataset
from voxelopt.data.pair import Pair
from voxelopt.data.subjects import (
    DEFAULT_SPLITS,
    Layout,
    Subject,
    find_subjects,
    validate_subjects,
)
from voxelopt.data.synthetic import make_pairs
from voxelopt.data.volumes import (
    downsample_volume,
    downsampled_shape,
    load_abdomen_ct,
    load_subject,
    prepare_volume,
)

__all__ = [
    "DEFAULT_SPLITS",
    "Layout",
    "Pair",
    "PairDataset",
    "Subject",
    "SyntheticPairDataset",
    "downsample_volume",
    "downsampled_shape",
    "find_subjects",
    "load_abdomen_ct",
    "load_subject",
    "make_pairs",
    "prepare_volume",
    "validate_subjects",
]
