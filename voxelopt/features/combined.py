"""Several extractors as one: per-branch pair normalisation, weighting and concatenation.

A combined extractor is named by joining registry names with ``+``, each optionally followed
by ``:WEIGHT`` (a number >= 0, default 1): ``"mind+obelisk"``, ``"mind+obelisk:0.5"``,
``"mind:2+obelisk_decoder"``. Names are case-insensitive; spaces around the parts are ignored.

How the branches are combined, for a fixed/moving pair (:meth:`CombinedExtractor.prepare_pair`):
each branch's features are prepared as that branch alone would be (jointly normalised over
the pair by :func:`~voxelopt.features.normalize_pair` when the branch asks for it, e.g.
OBELISK; left as they are otherwise, e.g. MIND), multiplied by the branch's scale and
concatenated over channels. The solver's cost is the *mean* over channels of
``|fixed_c - moving_c|`` (:func:`voxelopt.cost.cost_volume`), so a scale ``s_k >= 0`` on
branch ``k`` (``C_k`` of the ``C`` channels) makes the combined cost

    cost = sum_k s_k (C_k / C) cost_k,        cost_k = mean over branch k of |f_c - m_c|.

With ``balance=True`` (default) ``s_k = (w_k / sum_j w_j) (C / C_k)``, hence
``cost = sum_k (w_k / sum_j w_j) cost_k``: a convex combination of the branches' own costs.
Equal weights give every branch equal influence whatever its channel count (MIND has 12
channels, OBELISK 9), the cost keeps the scale of a single extractor's (the solver's
temperatures, entropies and smoothing were tuned on that scale), and one branch with any
weight is exactly that extractor. With ``balance=False`` ``s_k = w_k``: the channels are
concatenated as they are (weights 1 give the plain concatenation, where a branch's influence
grows with its channel count).

:meth:`CombinedExtractor.forward` on one image returns the *raw* branch outputs concatenated
(before pair normalisation and weighting) so that a fixed image's features can be cached;
the registration then calls :meth:`~voxelopt.features.FeatureExtractor.prepare_pair` on every
pair. For that reason the combined extractor reports ``pair_normalize=False``: its branches
are normalised inside ``prepare_pair``, never over the whole concatenation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from voxelopt.checks import check_features
from voxelopt.features.base import FeatureExtractor

__all__ = ["CombinedExtractor", "branch_scales", "route_kwargs", "split_combined_name"]

BranchName = tuple[str, float | None]
"""One branch of a combined name: ``(registry name, explicit weight or None)``."""


def _parse_weight(text: str, branch: str, name: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(
            f"bad weight {text!r} of branch {branch!r} in feature name {name!r}: "
            f"must be a finite number >= 0"
        )
    return weight


def split_combined_name(name: str) -> tuple[BranchName, ...]:
    """Split ``"a+b:0.5"`` into ``(("a", None), ("b", 0.5))`` (syntax only, names unchecked).

    Args:
        name: registry names joined by ``+``, each optionally ``NAME:WEIGHT``.

    Returns:
        ``(name, weight)`` per branch, names lowercased and stripped; ``weight`` is ``None``
        where the name gives none.

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: for an empty branch, a weight that is not a finite number >= 0, or
            explicit weights that are all zero.
    """
    if not isinstance(name, str):
        raise TypeError(f"feature name must be a string, got {type(name).__name__}")
    out = []
    for part in name.split("+"):
        branch, sep, weight_text = part.strip().partition(":")
        branch = branch.strip().lower()
        if not branch:
            raise ValueError(f"feature name {name!r} has an empty branch (use 'a+b' or 'a+b:0.5')")
        weight = _parse_weight(weight_text.strip(), branch, name) if sep else None
        out.append((branch, weight))
    if all(w == 0 for _, w in out):
        raise ValueError(f"feature name {name!r} gives every branch weight 0")
    return tuple(out)


def branch_scales(
    channels: Sequence[int], weights: Sequence[float], balance: bool = True
) -> tuple[float, ...]:
    """The factor each branch's prepared features are multiplied by (see the module docs).

    Args:
        channels: ``C_k`` per branch.
        weights: ``w_k >= 0`` per branch, not all zero.
        balance: ``s_k = (w_k / sum w) (C / C_k)`` if true, else ``s_k = w_k``.

    Returns:
        ``s_k`` per branch.
    """
    if len(channels) != len(weights) or not channels:
        raise ValueError(
            f"channels and weights must be non-empty and of one length, got {len(channels)} "
            f"and {len(weights)}"
        )
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) == 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {list(weights)}")
    if not balance:
        return tuple(w)
    total = sum(channels)
    return tuple(x / sum(w) * total / c for x, c in zip(w, channels, strict=True))


def route_kwargs(targets: Sequence[type], kwargs: Mapping[str, object]) -> list[dict]:
    """Give each keyword to every class in ``targets`` whose constructor accepts it.

    Args:
        targets: one class per branch.
        kwargs: keyword arguments for the branches (e.g. ``low``/``high`` for MIND and
            ``weights`` for OBELISK).

    Returns:
        One dict of keyword arguments per branch.

    Raises:
        TypeError: naming a keyword that no branch accepts.
    """
    accepted = []
    for cls in targets:
        params = inspect.signature(cls.__init__).parameters
        accepted.append(set(params) - {"self"})
    out: list[dict] = [{} for _ in targets]
    for key, value in kwargs.items():
        takers = [i for i, names in enumerate(accepted) if key in names]
        if not takers:
            raise TypeError(f"no branch of the combined extractor takes the keyword {key!r}")
        for i in takers:
            out[i][key] = value
    return out


class CombinedExtractor(FeatureExtractor):
    """Two or more extractors as one, with per-branch weights (see the module docs).

    Args:
        branches: the extractors, in channel order.
        weights: ``w_k >= 0`` per branch, not all zero (default: all 1).
        balance: scale each branch by ``(w_k / sum w) (C / C_k)`` so that the cost is the
            weighted mean of the branches' own costs (default); if false, by ``w_k``.
        names: a label per branch for ``repr`` (default: the class names).

    Attributes:
        scales: the factor ``s_k`` applied to each branch's prepared features.
    """

    def __init__(
        self,
        branches: Sequence[FeatureExtractor],
        weights: Sequence[float] | None = None,
        balance: bool = True,
        names: Sequence[str] | None = None,
    ) -> None:
        branches = list(branches)
        if not branches or not all(isinstance(b, FeatureExtractor) for b in branches):
            raise TypeError("branches must be a non-empty sequence of FeatureExtractor")
        weights = [1.0] * len(branches) if weights is None else list(weights)
        channels = [b.out_channels for b in branches]
        if len(weights) != len(branches):
            raise ValueError(f"weights must hold {len(branches)} numbers, got {len(weights)}")
        names = [type(b).__name__ for b in branches] if names is None else list(names)
        if len(names) != len(branches):
            raise ValueError(f"names must hold {len(branches)} labels, got {len(names)}")
        scales = branch_scales(channels, weights, balance)
        super().__init__(out_channels=sum(channels), pair_normalize=False)
        self.branches = nn.ModuleList(branches)
        self.context_voxels = max(b.context_voxels for b in branches)
        self.channels = tuple(channels)
        self.weights = tuple(float(w) for w in weights)
        self.balance = bool(balance)
        self.names = tuple(names)
        self.scales = scales

    def extract(self, image_hu: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` HU -> ``(B, sum C_k, D, H, W)`` raw branch outputs, concatenated.

        Not yet pair-normalised nor weighted: see :meth:`prepare_pair`.
        """
        return torch.cat([b.extract(image_hu) for b in self.branches], dim=1)

    def prepare_pair(self, fixed_feat: Tensor, moving_feat: Tensor) -> tuple[Tensor, Tensor]:
        """Prepare each branch as it would alone, scale it by ``s_k`` and concatenate.

        Args:
            fixed_feat: ``(B, sum C_k, D, H, W)`` output of :meth:`forward` (fixed image).
            moving_feat: ``(B, sum C_k, D', H', W')`` output for the moving image.

        Returns:
            ``(fixed, moving)`` with the input shapes.
        """
        for feat, arg in ((fixed_feat, "fixed_feat"), (moving_feat, "moving_feat")):
            check_features(feat, arg)
            if feat.shape[1] != self.out_channels:
                split = " + ".join(map(str, self.channels))
                raise ValueError(
                    f"{arg} must have {self.out_channels} channels ({split} of the branches), "
                    f"got {feat.shape[1]}"
                )
        fixed_out, moving_out = [], []
        pieces = zip(
            self.branches,
            self.scales,
            fixed_feat.split(self.channels, dim=1),
            moving_feat.split(self.channels, dim=1),
            strict=True,
        )
        for branch, scale, f, m in pieces:
            f, m = branch.prepare_pair(f, m)
            fixed_out.append(f * scale)
            moving_out.append(m * scale)
        return torch.cat(fixed_out, dim=1), torch.cat(moving_out, dim=1)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights, strict=True))
        return f"{parts}, balance={self.balance}, out_channels={self.out_channels}"
