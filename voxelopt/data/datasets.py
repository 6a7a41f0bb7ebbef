"""Plain torch datasets of registration pairs (no Lightning): real pairs and synthetic ones.

A sample is :meth:`voxelopt.data.pair.Pair.sample`::

    fixed, moving:             (1, D, H, W) float32, Hounsfield units (optionally clipped)
    fixed_label, moving_label: (1, D, H, W) int64 organ labels (0 = background)
    spacing:                   (3,) float32 voxel size in mm along (D, H, W)
    pair_id:                   int, unique within the split (keys the metric state under DDP)
    pair:                      str, "<fixed>_<moving>" subject numbers, e.g. "0024_0025"
    true_disp:                 (3, D, H, W) float32, synthetic pairs only: the known field in
                               voxels with ``fixed(x) = moving(x + true_disp(x))``

A batch is the default collation of samples (tensors stacked, ``pair`` a list of str).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.utils.data import Dataset

from voxelopt.data.pair import Pair
from voxelopt.data.subjects import Subject
from voxelopt.data.volumes import load_subject

__all__ = ["PairDataset", "SyntheticPairDataset"]


class PairDataset(Dataset):
    """Every ordered pair of distinct subjects (fixed, moving) of one split.

    Args:
        subjects: the split's subjects (at least two).
        downsample: grid reduction factor (see :func:`load_subject`).
        clip_hu: optional HU window applied to every image.
        cache: keep each loaded subject in memory (per process / worker).
        spacing_mm: working grid in mm or ``"auto"`` (see
            :func:`voxelopt.data.volumes.prepare_volume`).
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        downsample: int = 1,
        clip_hu: tuple[float, float] | None = None,
        cache: bool = True,
        spacing_mm: float | str | None = None,
    ) -> None:
        if len(subjects) < 2:
            raise ValueError(
                f"a split needs at least 2 subjects to form pairs, got {len(subjects)}"
            )
        self.subjects = list(subjects)
        self.pairs = [(f, m) for f in self.subjects for m in self.subjects if f.id != m.id]
        self.downsample = downsample
        self.clip_hu = clip_hu
        self.cache = cache
        self.spacing_mm = spacing_mm
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, subject: Subject) -> tuple[Tensor, Tensor, Tensor]:
        if subject.id in self._cache:
            return self._cache[subject.id]
        out = load_subject(subject, self.downsample, self.clip_hu, self.spacing_mm)
        if self.cache:
            self._cache[subject.id] = out
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"pair index {index} out of range [0, {len(self.pairs)})")
        fixed_s, moving_s = self.pairs[index]
        fixed, fixed_label, spacing = self._load(fixed_s)
        moving, moving_label, moving_spacing = self._load(moving_s)
        if fixed.shape != moving.shape:
            raise ValueError(
                f"subjects {fixed_s.id} and {moving_s.id} have different grids "
                f"{tuple(fixed.shape[1:])} and {tuple(moving.shape[1:])}; resample them first"
            )
        pair = Pair(
            fixed[None],
            moving[None],
            fixed_label[None],
            moving_label[None],
            tuple(float(s) for s in spacing),
            name=f"{fixed_s.id:04d}_{moving_s.id:04d}",
        )
        return pair.sample(index)


class SyntheticPairDataset(Dataset):
    """Pairs made from real volumes by known random smooth deformations and intensity changes.

    Pair ``i`` uses base volume ``i % len(volumes)`` and the seed ``seed + i``, so it is the
    same on every call, worker and rank. The moving image is the base volume (optionally
    pre-deformed by a second random field, so that the moving images differ too) with a smooth
    intensity bias and noise; the fixed image is the moving one warped by the true field
    (:func:`voxelopt.phantom.make_pair`), kept as ``true_disp`` for the endpoint error.

    Args:
        volumes: ``(image (1, D, H, W) HU, label (1, D, H, W), spacing (3,) mm)`` per base
            volume, as :func:`prepare_volume` returns.
        num_pairs: number of pairs.
        seed: seed of pair 0.
        max_displacement_mm: largest displacement of the true field.
        control_spacing_mm: control-point distance of the random fields (organ scale).
        moving_displacement_mm: largest displacement of the moving image's pre-deformation
            (0 keeps the base volume as the moving image).
        intensity_change: add a smooth bias and noise to the moving image.
        bias_hu: amplitude of the smooth intensity bias.
        noise_hu: standard deviation of the noise.
    """

    def __init__(
        self,
        volumes: Sequence[tuple[Tensor, Tensor, Tensor]],
        num_pairs: int,
        seed: int = 0,
        max_displacement_mm: float = 15.0,
        control_spacing_mm: float = 40.0,
        moving_displacement_mm: float = 0.0,
        intensity_change: bool = True,
        bias_hu: float = 30.0,
        noise_hu: float = 10.0,
    ) -> None:
        if not volumes:
            raise ValueError("volumes is empty: synthetic pairs need at least one base volume")
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        for name, value in (
            ("max_displacement_mm", max_displacement_mm),
            ("moving_displacement_mm", moving_displacement_mm),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.volumes = list(volumes)
        self.num_pairs = num_pairs
        self.seed = seed
        self.max_displacement_mm = float(max_displacement_mm)
        self.control_spacing_mm = float(control_spacing_mm)
        self.moving_displacement_mm = float(moving_displacement_mm)
        self.intensity_change = intensity_change
        self.bias_hu = float(bias_hu)
        self.noise_hu = float(noise_hu)

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range [0, {self.num_pairs})")
        from voxelopt.phantom import make_pair, random_smooth_displacement
        from voxelopt.transform import warp

        image, label, spacing = self.volumes[index % len(self.volumes)]
        seed = self.seed + index
        spacing_mm = tuple(float(s) for s in spacing)
        if self.moving_displacement_mm > 0:
            pre = random_smooth_displacement(
                image.shape[1:],
                self.moving_displacement_mm,
                control_spacing=self.control_spacing_mm,
                seed=-1 - seed,  # a stream of its own, disjoint from the pair seeds
                diffeomorphic=True,
                spacing=spacing_mm,
            )
            image = warp(image[None], pre, padding_mode="border")[0]
            label = warp(label[None], pre, mode="nearest", padding_mode="border")[0]
        pair = make_pair(
            image[0],
            label[0],
            self.max_displacement_mm,
            spacing_mm,
            seed=seed,
            intensity_change=self.intensity_change,
            control_spacing_mm=self.control_spacing_mm,
            bias_hu=self.bias_hu,
            noise_hu=self.noise_hu,
        )
        pair.name = f"syn{seed}"
        return pair.sample(index)
