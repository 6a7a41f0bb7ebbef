"""Training curves from Lightning's CSV log as a PNG: ``python -m models.curves METRICS_CSV``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

__all__ = ["plot_curves", "read_metrics"]


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of a :class:`lightning.pytorch.loggers.CSVLogger` as curves.

    Args:
        path: the CSV file (``runs/csv/version_N/metrics.csv``).

    Returns:
        ``{metric: [(step, value), ...]}`` for every column with at least one value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {path} is not a file (expected a Lightning metrics.csv)")
    curves: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    curves.setdefault(key, []).append((step, float(value)))
    return curves


def plot_curves(path: str | Path, out: str | Path | None = None, title: str = "") -> Path:
    """Plot the training loss (and its parts) and the validation Dice against the step.

    Args:
        path: Lightning ``metrics.csv``.
        out: PNG to write (default ``curves.png`` beside the CSV).
        title: figure title.

    Returns:
        The PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_metrics(path)
    out = Path(out) if out is not None else Path(path).with_name("curves.png")
    train = sorted(k for k in curves if k.startswith("train/"))
    val = [k for k in ("val/dice",) if k in curves]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in train:
        steps, values = zip(*curves[key], strict=True)
        axes[0].plot(steps, values, label=key, lw=1)
    axes[0].set(xlabel="step", ylabel="loss", title="training (soft argmin)")
    axes[0].legend(fontsize=7)
    for key in val:
        steps, values = zip(*curves[key], strict=True)
        axes[1].plot(steps, values, "o-", label=key)
    axes[1].set(xlabel="step", ylabel="Dice", title="validation (hard argmin)")
    if val:
        axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m models.curves METRICS_CSV [OUT_PNG]")
    print(plot_curves(*sys.argv[1:]))
