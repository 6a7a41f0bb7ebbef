"""Diagnostic measurements of ``bench_ablation.py`` (its ``--diagnostics`` output).

Why OBELISK features register worse than MIND at the published defaults: how decisive the
finest-level cost volume is at the true alignment (:func:`cost_stats`), how strongly the
adaptive filter smooths relative to the fixed one (:func:`smoothing_strength`), where the
OBELISK crop lies and how well its logits segment (:func:`obelisk_box_stats`), and a figure of
the finest-level entropy and sigma maps (:func:`save_entropy_figure`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from voxelopt.cost import cost_volume
from voxelopt.entropy import displacement_entropy
from voxelopt.features.obelisk import ObeliskFeatures
from voxelopt.filtering import side_weight
from voxelopt.metrics import endpoint_error


def cost_stats(fixed: torch.Tensor, moving: torch.Tensor, beta: float, body: torch.Tensor) -> dict:
    """How decisive the finest-level cost volume is: the quantities behind the entropy.

    On the pair at full resolution with the moving features warped by the true field (the
    finest level's situation once the coarser levels are right): the median over body voxels
    of the gap between the second-best and the best of the 27 costs, of the spread
    (max - min) of the 27 costs, both also divided by ``beta``, and the median normalised
    entropy ``E / log 27``; plus the fraction of body voxels whose 27 costs are all within
    ``beta / 10`` of each other (a flat, uninformative cost).
    """
    cost = cost_volume(fixed, moving, 1)[0]  # (27, D, H, W)
    mask = body[0, 0]
    c = cost[:, mask]  # (27, N)
    srt = c.sort(dim=0).values
    gap = srt[1] - srt[0]
    spread = srt[-1] - srt[0]
    ent = displacement_entropy(cost[None], beta)[0, 0][mask] / float(np.log(27))
    return {
        "gap": float(gap.median()),
        "gap_beta": float(gap.median()) / beta,
        "spread": float(spread.median()),
        "spread_beta": float(spread.median()) / beta,
        "entropy": float(ent.median()),
        "flat_pct": 100.0 * float((spread < beta / 10).double().mean()),
    }


def obelisk_box_stats(
    extractor: ObeliskFeatures,
    hu: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    body: torch.Tensor,
    disp: torch.Tensor,
    true_disp: torch.Tensor,
    spacing,
) -> dict:
    """Where the OBELISK crop lies, how well its logits segment, and the EPE inside/outside it."""
    box = extractor.box_for(hu)
    inside = torch.zeros_like(body)
    (d0, d1), (h0, h1), (w0, w1) = box
    inside[..., d0:d1, h0:h1, w0:w1] = True
    # argmax of the raw logits against the labels, on the organs OBELISK has a class for
    btcv_to_obelisk = {1: 1, 3: 3, 4: 4, 6: 6, 7: 7, 11: 2}
    pred = logits[0].argmax(0)
    seg = {}
    for b, o in btcv_to_obelisk.items():
        t, q = labels[0, 0] == b, pred == o
        seg[b] = 2.0 * float((t & q).sum()) / max(1, int(t.sum() + q.sum()))
    organ = labels > 0
    return {
        "box": box,
        "body_in_box_pct": 100.0 * float((body & inside).sum()) / float(body.sum()),
        "organs_in_box_pct": 100.0 * float((organ & inside).sum()) / max(1, int(organ.sum())),
        "epe_in": float(endpoint_error(disp, true_disp, spacing, body & inside)[0]),
        "epe_out": float(endpoint_error(disp, true_disp, spacing, body & ~inside)[0]),
        "dice_argmax": seg,
    }


def smoothing_strength(levels) -> list[float]:
    """Per level (finest first): mean side weight of the adaptive filter / that of sigma 0.5.

    The 3-tap kernel's neighbour weight is what the message passing actually mixes in; 1.0
    means as much smoothing as the non-adaptive ablation (fixed sigma 0.5).
    """
    ref = side_weight(0.5)
    return [float(side_weight(lv.sigma).mean()) / ref for lv in levels]


def save_entropy_figure(
    path: Path,
    fixed_hu: torch.Tensor,
    fixed_labels: torch.Tensor,
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Coronal slice through the organs' centre: fixed CT, finest-level entropy and sigma.

    Args:
        path: the PNG to write (atomically).
        fixed_hu: fixed CT ``(1, 1, D, H, W)`` in HU.
        fixed_labels: fixed labels ``(1, 1, D, H, W)``.
        maps: per feature name, finest-level entropy (nats) and sigma (voxels), each
            ``(1, 1, D, H, W)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axis = 1
    index = int(torch.nonzero(fixed_labels[0, 0] > 0)[:, axis].float().mean().round())

    def sl(v: torch.Tensor) -> np.ndarray:
        return np.take(v[0, 0].float().numpy(), index, axis=axis).T

    ncol = 1 + 2 * len(maps)
    fig = Figure(figsize=(3.0 * ncol, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, ncol, 1)
    ax.imshow(sl(fixed_hu), cmap="gray", vmin=-500, vmax=800, origin="lower")
    ax.contour(
        sl(fixed_labels.float()) > 0, levels=[0.5], colors="c", linewidths=0.5, origin="lower"
    )
    ax.set_title(f"fixed CT, coronal {index}")
    ax.axis("off")
    col = 2
    for name, (ent, sig) in maps.items():
        e = ent / float(np.log(27))
        ax = fig.add_subplot(1, ncol, col)
        im = ax.imshow(sl(e), cmap="magma", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"{name}: entropy / log 27")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax = fig.add_subplot(1, ncol, col + 1)
        im = ax.imshow(sl(sig), cmap="viridis", vmin=0.1, vmax=0.5, origin="lower")
        ax.set_title(f"{name}: sigma (voxels)")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
        col += 2
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
