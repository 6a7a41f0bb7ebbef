"""Image-level registration: the registration-model contract, and VoxelOpt as one.

A *registration model* (:class:`RegistrationModel`) is any callable module with
``forward(fixed_hu, moving_hu) -> displacement``: ``(B, 1, D, H, W)`` CT in Hounsfield units on
one grid in, ``(B, 3, D, H, W)`` in voxels out, ``warp(moving_hu, u) ~ fixed_hu``. The command
line, the comparison runner and the Lightning module rely on nothing else. A model whose solver
has a hard and a soft argmin also implements :class:`ArgminSwitchable`; :func:`argmin_mode`
switches any model for a while (soft to train end to end, hard to evaluate as published) and
does nothing for models without one.

:class:`VoxelOptRegistration` is feature extraction followed by the VoxelOpt solver.
:func:`register` is the notebook entry point: arrays in, moved image, moved labels, field and
scores out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from voxelopt.checks import as_volume_tensor, check_image_pair
from voxelopt.config import VoxelOptConfig
from voxelopt.evaluation import PairScores
from voxelopt.features import CachedExtractor, FeatureExtractor, build_extractor
from voxelopt.masking import erode
from voxelopt.pyramid import VoxelOpt, VoxelOptResult
from voxelopt.transform import resize_displacement, resize_volume

__all__ = [
    "ArgminSwitchable",
    "RegistrationModel",
    "RegistrationResult",
    "VoxelOptRegistration",
    "argmin_mode",
    "register",
]

ArgminMode = Literal["hard", "soft"]


@runtime_checkable
class RegistrationModel(Protocol):
    """Anything that registers a pair: ``(B, 1, D, H, W)`` HU twice -> ``(B, 3, D, H, W)``."""

    def __call__(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor: ...


@runtime_checkable
class ArgminSwitchable(Protocol):
    """A registration model whose discrete solver has a hard and a soft argmin."""

    def use_argmin(self, mode: ArgminMode) -> AbstractContextManager[None]:
        """Context manager: the model uses ``mode`` inside, its own setting again after."""
        ...


@contextmanager
def argmin_mode(model: object, mode: ArgminMode | None) -> Iterator[None]:
    """Run ``model`` with the hard or soft argmin for a while.

    Typical use: train with the soft argmin (differentiable end to end), then evaluate the
    same model as published, ``with argmin_mode(model, "hard"): model(fixed, moving)``.

    Args:
        model: a registration model; one that is not :class:`ArgminSwitchable` (a baseline
            without a discrete solver) is left as it is.
        mode: ``"hard"``, ``"soft"``, or ``None`` to keep the model's own setting.
    """
    if mode not in (None, "hard", "soft"):
        raise ValueError(f"argmin mode must be 'hard', 'soft' or None, got {mode!r}")
    if mode is None or not isinstance(model, ArgminSwitchable):
        yield
        return
    with model.use_argmin(mode):
        yield


class VoxelOptRegistration(nn.Module):
    """Feature extraction followed by the VoxelOpt solver.

    Args:
        extractor: a :class:`~voxelopt.features.FeatureExtractor` or a registry name
            (``"raw"``, ``"mind"``, ``"obelisk"``, ``"universal"``).
        config: solver configuration (defaults: the reference implementation's).
        downsample: solve on features resampled to ``1 / downsample`` of the image grid (the
            reference registers at half resolution: 2); the field is returned on the image
            grid.
        extractor_kwargs: keyword arguments for :func:`~voxelopt.features.build_extractor`
            when ``extractor`` is a name.
        cache_fixed: keep the features of this many fixed images and reuse them when the same
            fixed image is registered again (one network forward for a fixed image registered
            to many moving images, as in all-pairs evaluation). Images are recognised by the
            ``fixed_key`` passed to :meth:`forward` (e.g. the file path) or else by a digest
            of their voxels. An extractor with trainable parameters is never cached. 0 disables.
        **config_overrides: fields of :class:`~voxelopt.VoxelOptConfig` to change.
    """

    def __init__(
        self,
        extractor: FeatureExtractor | str = "mind",
        config: VoxelOptConfig | None = None,
        downsample: int = 1,
        extractor_kwargs: dict | None = None,
        cache_fixed: int = 0,
        **config_overrides,
    ) -> None:
        super().__init__()
        if isinstance(extractor, str):
            extractor = build_extractor(extractor, **(extractor_kwargs or {}))
        elif extractor_kwargs:
            raise ValueError("extractor_kwargs is only used when extractor is given by name")
        if not isinstance(downsample, int) or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}")
        if not isinstance(cache_fixed, int) or cache_fixed < 0:
            raise ValueError(f"cache_fixed must be an integer >= 0, got {cache_fixed!r}")
        self.extractor = extractor
        self.fixed_cache = CachedExtractor(extractor, cache_fixed) if cache_fixed else None
        self.solver = VoxelOpt(config, **config_overrides)
        self.downsample = downsample

    @property
    def config(self) -> VoxelOptConfig:
        """The solver's configuration."""
        return self.solver.config

    def features(
        self, fixed_hu: Tensor, moving_hu: Tensor, fixed_key: Hashable | None = None
    ) -> tuple[Tensor, Tensor]:
        """Features of both images, jointly normalised where the extractor asks for it.

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` fixed CT in HU.
            moving_hu: ``(B, 1, D, H, W)`` moving CT in HU on the same grid.
            fixed_key: identity of the fixed image for ``cache_fixed`` (e.g. its path).

        Returns:
            ``(fixed, moving)`` features ``(B, C, D', H', W')`` on the solver's grid.
        """
        fixed_hu, moving_hu = check_image_pair(fixed_hu, moving_hu)
        if self.fixed_cache is not None and not self._extractor_trainable():
            key = fixed_key if fixed_key is not None else _digest(fixed_hu)
            fixed = self.fixed_cache(fixed_hu, key)
        else:
            fixed = self.extractor(fixed_hu)
        moving = self.extractor(moving_hu)
        fixed, moving = self.extractor.prepare_pair(fixed, moving)
        if self.downsample > 1:
            from voxelopt.data.volumes import downsampled_shape

            shape = downsampled_shape(fixed.shape[2:], self.downsample)
            fixed, moving = resize_volume(fixed, shape), resize_volume(moving, shape)
        return fixed, moving

    @contextmanager
    def use_argmin(self, mode: ArgminMode) -> Iterator[None]:
        """Solve with the ``"hard"`` or ``"soft"`` argmin inside the context (see
        :func:`argmin_mode`)."""
        saved = self.solver.config
        self.solver.config = saved.replace(argmin=mode)
        try:
            yield
        finally:
            self.solver.config = saved

    def _extractor_trainable(self) -> bool:
        """Whether the extractor has parameters to train (then its output is never cached)."""
        return any(p.requires_grad for p in self.extractor.parameters())

    def solver_masks(
        self, fixed_mask: Tensor | None, moving_mask: Tensor | None, shape: Sequence[int]
    ) -> dict[str, Tensor]:
        """Image-grid masks as the solver takes them: eroded by the extractor's
        ``context_voxels`` (features that see beyond the data are not trusted) and resized to
        the solver's grid ``shape``.

        Args:
            fixed_mask: ``(B, 1, D, H, W)`` in ``[0, 1]`` on the image grid (1 = data), or ``None``.
            moving_mask: the same for the moving image (on the same grid), or ``None``.
            shape: the solver's ``(D', H', W')``.

        Returns:
            ``{"fixed_mask": ..., "moving_mask": ...}`` holding the masks that were given.
        """
        out = {}
        for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
            if mask is not None:
                if not isinstance(mask, Tensor) or mask.dim() != 5:
                    raise ValueError(f"{name} must be a (B, 1, D, H, W) tensor")
                mask = erode(mask.float(), int(self.extractor.context_voxels))
                out[name] = resize_volume(mask, shape)
        return out

    def solve(
        self,
        fixed_hu: Tensor,
        moving_hu: Tensor,
        fixed_key: Hashable | None = None,
        fixed_mask: Tensor | None = None,
        moving_mask: Tensor | None = None,
    ) -> VoxelOptResult:
        """Register and also return the solver's per-level entropy and sigma maps.

        The displacement is on the image grid; the maps stay on the solver's grids. Masks:
        see :meth:`forward`.
        """
        fixed, moving = self.features(fixed_hu, moving_hu, fixed_key)
        masks = self.solver_masks(fixed_mask, moving_mask, fixed.shape[2:])
        result = self.solver.solve(fixed, moving, **masks)
        result.displacement = resize_displacement(result.displacement, fixed_hu.shape[2:])
        return result

    def forward(
        self,
        fixed_hu: Tensor,
        moving_hu: Tensor,
        fixed_key: Hashable | None = None,
        fixed_mask: Tensor | None = None,
        moving_mask: Tensor | None = None,
    ) -> Tensor:
        """Displacement ``(B, 3, D, H, W)`` in voxels with ``warp(moving_hu, u) ~ fixed_hu``.

        Args:
            fixed_hu: ``(B, 1, D, H, W)`` fixed CT in HU.
            moving_hu: ``(B, 1, D, H, W)`` moving CT in HU on the same grid.
            fixed_key: identity of the fixed image for ``cache_fixed``.
            fixed_mask: optional ``(B, 1, D, H, W)`` in ``[0, 1]``: where the fixed image has data.
            moving_mask: optional, the same for the moving image (e.g. its field of view after
                pre-alignment, :func:`voxelopt.fov.coverage`). Voxels outside either carry no
                cost signal (:mod:`voxelopt.masking`).
        """
        return self.solve(fixed_hu, moving_hu, fixed_key, fixed_mask, moving_mask).displacement


def _digest(image: Tensor) -> tuple:
    """Content key of an image: shape, dtype and a BLAKE2 digest of its bytes (~5 ms/1M vox)."""
    data = image.detach().contiguous().cpu().numpy().tobytes()
    return (tuple(image.shape), str(image.dtype), hashlib.blake2b(data, digest_size=16).digest())


@dataclass
class RegistrationResult:
    """What :func:`register` returns (single pair, on the fixed grid).

    Attributes:
        displacement: ``(3, D, H, W)`` float32 in voxels; ``moved(x) = moving(x + u(x))``.
        moved: ``(D, H, W)`` moving image warped onto the fixed image (trilinear).
        entropy: ``(D, H, W)`` displacement entropy of the finest level, on the fixed grid.
        moved_labels: ``(D, H, W)`` warped moving labels (nearest), when given.
        runtime_s: wall time of feature extraction and solving, in seconds.
        scores: the pair's :class:`~voxelopt.evaluation.PairScores` (Dice and HD95 when both
            label maps are given; SDlogJ and folding always).
        metrics: ``scores.to_json()``: JSON-safe, ``None`` where a score is undefined.
    """

    displacement: np.ndarray
    moved: np.ndarray
    entropy: np.ndarray
    moved_labels: np.ndarray | None = None
    runtime_s: float = 0.0
    scores: PairScores = field(default_factory=PairScores)
    metrics: dict = field(default_factory=dict)


def register(
    fixed,
    moving,
    *,
    fixed_labels=None,
    moving_labels=None,
    features: str | FeatureExtractor = "mind",
    config: VoxelOptConfig | None = None,
    spacing: float | Sequence[float] = 1.0,
    working_spacing: float | str = "auto",
    affine: str = "none",
    fixed_mask=None,
    moving_mask=None,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> RegistrationResult:
    """Register one pair of CT volumes already on the same grid (for notebooks).

    The same pipeline as ``voxelopt register`` (:func:`voxelopt.pipeline.register_volumes`):
    the images are resampled (anti-aliased) onto a working grid, features and solver run
    there, the scores are computed there, and the field, moved image and labels come back on
    the input grid.

    Args:
        fixed: ``(D, H, W)`` fixed CT in Hounsfield units (numpy array or tensor), RAS+ axes.
        moving: ``(D, H, W)`` moving CT in HU on the same grid.
        fixed_labels: optional ``(D, H, W)`` integer labels of the fixed image.
        moving_labels: optional ``(D, H, W)`` integer labels of the moving image.
        features: extractor name or instance.
        config: solver configuration; ``**config_overrides`` change single fields.
        spacing: voxel size of the input grid in mm.
        working_spacing: voxel size of the working grid in mm, or ``"auto"`` (the input's
            own unless that exceeds the voxel budget, see :func:`voxelopt.grid.working_spacing`).
        affine: ``"none"`` (default: the arrays are already aligned), ``"rigid"`` or
            ``"affine"`` pre-alignment (:func:`voxelopt.affine.align_affine`), composed into
            the returned displacement.
        fixed_mask: optional ``(D, H, W)`` mask (nonzero = use) of the fixed image: voxels
            outside carry no cost signal (:mod:`voxelopt.masking`); images' fields of view
            and constant edge slabs are handled without it (:mod:`voxelopt.fov`).
        moving_mask: optional ``(D, H, W)`` mask of the moving image, likewise.
        device: where to run (``"cpu"`` or ``"cuda"``).

    Returns:
        :class:`RegistrationResult`.

    Example:
        >>> from voxelopt.phantom import make_phantom
        >>> hu, labels = make_phantom((32, 32, 32))
        >>> result = register(hu, hu, features="raw", levels=2)
        >>> result.displacement.shape
        (3, 32, 32, 32)
    """
    from voxelopt.pipeline import register_volumes, volume_from_array
    from voxelopt.transform import resize_volume

    f, m, fl, ml = _register_inputs(fixed, moving, fixed_labels, moving_labels)
    volumes = [None if x is None else volume_from_array(x[0, 0], spacing) for x in (f, m, fl, ml)]
    masks = [
        None
        if x is None
        else volume_from_array(as_volume_tensor(x, name, torch.int64)[0, 0], spacing)
        for x, name in ((fixed_mask, "fixed_mask"), (moving_mask, "moving_mask"))
    ]
    matrix = None
    if affine != "none":
        from voxelopt.affine import align_affine

        matrix = align_affine(volumes[0], volumes[1], mode=affine).matrix
    model = VoxelOptRegistration(features, config, **config_overrides)
    result = register_volumes(
        volumes[0],
        volumes[1],
        fixed_labels=volumes[2],
        moving_labels=volumes[3],
        spacing=working_spacing,
        matrix=matrix,
        fixed_mask=masks[0],
        moving_mask=masks[1],
        device=device,
        model=model,
    )
    entropy = torch.from_numpy(np.ascontiguousarray(result.entropy, dtype=np.float32))
    entropy = resize_volume(entropy[None, None], f.shape[2:])[0, 0]
    return RegistrationResult(
        displacement=result.displacement()[0].float().cpu().numpy(),
        moved=np.asarray(result.moved),
        entropy=entropy.numpy(),
        moved_labels=None if result.moved_labels is None else np.asarray(result.moved_labels),
        runtime_s=result.runtime_s,
        scores=result.scores,
        metrics=result.metrics,
    )


def _register_inputs(fixed, moving, fixed_labels, moving_labels):
    """The four inputs of :func:`register` as ``(1, 1, D, H, W)`` tensors, checked."""
    f = as_volume_tensor(fixed, "fixed")
    m = as_volume_tensor(moving, "moving")
    if f.shape != m.shape:
        raise ValueError(
            f"fixed {tuple(f.shape[2:])} and moving {tuple(m.shape[2:])} are on different grids"
        )
    fl = ml = None
    if fixed_labels is not None:
        fl = as_volume_tensor(fixed_labels, "fixed_labels", torch.int64)
        if fl.shape != f.shape:
            raise ValueError(f"fixed_labels {tuple(fl.shape[2:])} do not match fixed image grid")
    if moving_labels is not None:
        ml = as_volume_tensor(moving_labels, "moving_labels", torch.int64)
        if ml.shape != m.shape:
            raise ValueError(f"moving_labels {tuple(ml.shape[2:])} do not match moving image grid")
    if (fl is None) != (ml is None):
        given = "fixed_labels" if fl is not None else "moving_labels"
        raise ValueError(f"{given} was given without the other label map; give both or neither")
    return f, m, fl, ml
