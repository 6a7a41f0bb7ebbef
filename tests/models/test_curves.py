"""Training curves from Lightning's metrics.csv."""

from __future__ import annotations

import pytest

from models.curves import plot_curves, read_metrics

CSV = """epoch,step,train/loss,train/soft_dice,val/dice
0,4,0.5,0.7,
0,9,0.25,0.8,
0,9,,,0.85
1,14,0.125,,
"""


def test_read_metrics_keeps_only_logged_values(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    curves = read_metrics(path)
    assert curves == {
        "train/loss": [(4, 0.5), (9, 0.25), (14, 0.125)],
        "train/soft_dice": [(4, 0.7), (9, 0.8)],
        "val/dice": [(9, 0.85)],
    }


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    out = plot_curves(path, title="t")
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        read_metrics(tmp_path / "nope.csv")
