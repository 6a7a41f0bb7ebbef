"""The methods of the comparison table: how each is built, and the small wrappers they need.

Each row of the table is a :class:`MethodSpec`: a display name, the kind of method, and a
builder that returns a registration model (:class:`voxelopt.registration.RegistrationModel`)
or raises ``ImportError``/``FileNotFoundError`` when it cannot run (the row is then listed as
skipped with the reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from voxelopt.data.volumes import downsampled_shape
from voxelopt.transform import resize_displacement, resize_volume

__all__ = ["DEFAULT_METHODS", "METHODS", "BuildContext", "Identity", "MethodSpec", "Resampled"]


DEFAULT_METHODS = (
    "initial",
    "voxelopt_mind",
    "voxelopt_obelisk",
    "convex_adam",
    "voxelmorph",
    "ants",
    "elastix",
)


class Identity(nn.Module):
    """The "Initial" row: the zero displacement."""

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        b, _, *shape = fixed_hu.shape
        return fixed_hu.new_zeros(b, 3, *shape)


class Resampled(nn.Module):
    """Run ``model`` on images ``factor`` times coarser, return its field on the input grid.

    For a network trained at another resolution (VoxelMorph trained at ~6 mm, compared at
    3 mm): the images are resized to the grid of :func:`voxelopt.data.downsampled_shape`
    (``ceil(n / factor)`` voxels, as the training data's ``downsample``); the displacement is
    resampled back and rescaled to voxels of the input grid.
    """

    def __init__(self, model: nn.Module, factor: int) -> None:
        super().__init__()
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"input_downsample must be an integer >= 1, got {factor!r}")
        self.model = model
        self.factor = factor

    def forward(self, fixed_hu: Tensor, moving_hu: Tensor) -> Tensor:
        shape = fixed_hu.shape[2:]
        if self.factor == 1:
            return self.model(fixed_hu, moving_hu)
        coarse = [max(n, 2) for n in downsampled_shape(shape, self.factor)]
        disp = self.model(resize_volume(fixed_hu, coarse), resize_volume(moving_hu, coarse))
        return resize_displacement(disp, shape)


@dataclass
class BuildContext:
    """What method builders may use: the pairs' affine, options, checkpoint, device."""

    affine: np.ndarray
    options: dict
    voxelmorph_ckpt: str | None
    threads: int | None
    device: torch.device


def _opts(ctx: BuildContext, key: str) -> dict:
    value = ctx.options.get(key, {}) or {}
    if not isinstance(value, dict):
        raise ValueError(f"options.{key} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _voxelopt(extractor: str) -> Callable[[BuildContext], nn.Module]:
    def build(ctx: BuildContext) -> nn.Module:
        from voxelopt.registration import VoxelOptRegistration

        kwargs = _opts(ctx, "voxelopt") | _opts(ctx, f"voxelopt_{extractor}")
        return VoxelOptRegistration(extractor, **kwargs)

    return build


def _convex_adam(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.convex_adam import ConvexAdam

    return ConvexAdam(**_opts(ctx, "convex_adam"))


def _voxelmorph(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.voxelmorph import VoxelMorph

    if not ctx.voxelmorph_ckpt:
        raise FileNotFoundError(
            "no checkpoint given (--voxelmorph_ckpt; train one with "
            "configs/baseline_voxelmorph_semisup.yaml)"
        )
    path = Path(ctx.voxelmorph_ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"VoxelMorph checkpoint not found: {path}")
    kwargs = _opts(ctx, "voxelmorph")
    factor = kwargs.pop("input_downsample", 1)  # the training data's grid reduction
    model = VoxelMorph(**kwargs)
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    prefix = "model."  # RegistrationModule keeps the registration model under .model
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return Resampled(model, factor).eval()


def _ants(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.ants import AntsSyN, ants_available

    ok, reason = ants_available()
    if not ok:
        raise ImportError(reason)
    return AntsSyN(ctx.affine, **({"threads": ctx.threads} | _opts(ctx, "ants")))


def _elastix(ctx: BuildContext) -> nn.Module:
    from voxelopt.baselines.elastix import ElastixBSpline, elastix_available

    ok, reason = elastix_available()
    if not ok:
        raise ImportError(reason)
    return ElastixBSpline(ctx.affine, **({"threads": ctx.threads} | _opts(ctx, "elastix")))


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: display name, kind of method, builder, and whether it runs on CPU."""

    label: str
    kind: str
    build: Callable[[BuildContext], nn.Module]
    cpu_only: bool = False


METHODS: dict[str, MethodSpec] = {
    "initial": MethodSpec("Initial", "-", lambda ctx: Identity()),
    "voxelopt_mind": MethodSpec("VoxelOpt (MIND)", "discrete, zero-shot", _voxelopt("mind")),
    "voxelopt_obelisk": MethodSpec(
        "VoxelOpt (OBELISK)", "discrete, pretrained features", _voxelopt("obelisk")
    ),
    "convex_adam": MethodSpec("ConvexAdam", "discrete + instance opt.", _convex_adam),
    "voxelmorph": MethodSpec("VoxelMorph", "learning", _voxelmorph),
    "ants": MethodSpec("ANTs SyN", "iterative", _ants, cpu_only=True),
    "elastix": MethodSpec("elastix B-spline", "iterative", _elastix, cpu_only=True),
}
