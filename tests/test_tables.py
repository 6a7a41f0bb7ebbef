"""Tests of voxelopt.tables: the one Markdown / CSV table writer."""

from __future__ import annotations

import csv
import math

import pytest

from voxelopt.tables import (
    format_number,
    markdown_table,
    mean_std,
    summary_rows,
    write_csv,
    write_text,
)


@pytest.mark.parametrize(
    ("value", "kwargs", "text"),
    [
        (None, {}, "-"),
        (float("nan"), {}, "-"),
        (0.123456, {}, "0.1235"),
        (0.5, {"digits": 1, "style": "f", "scale": 100}, "50.0"),
        (3, {}, "3"),
        ("abc", {}, "abc"),
    ],
)
def test_format_number(value, kwargs, text):
    assert format_number(value, **kwargs) == text


def test_mean_std():
    assert mean_std([1.0, 3.0]) == f"2.00 ± {math.sqrt(2):.2f}"
    assert mean_std([0.5], scale=100, digits=1) == "50.0"
    assert mean_std([float("nan")]) == "-"


def test_markdown_table_against_plain_reference():
    rows = [{"method": "a", "dice": 0.5, "hd95": float("nan")}, {"method": "b", "dice": 0.25}]
    text = markdown_table(rows, ["method", "dice", "hd95"])
    expected = "\n".join(
        [
            "| method | dice | hd95 |",
            "| --- | --- | --- |",
            "| a | 0.5 | - |",
            "| b | 0.25 | - |",
        ]
    )
    assert text == expected + "\n"
    titled = markdown_table(rows, ["dice"], headers=["Dice"], fmt=lambda v: f"<{v}>")
    assert titled.splitlines()[0] == "| Dice |" and titled.splitlines()[2] == "| <0.5> |"


def test_markdown_table_errors():
    with pytest.raises(ValueError, match="empty"):
        markdown_table([])
    with pytest.raises(ValueError, match="headers"):
        markdown_table([{"a": 1}], ["a"], headers=["A", "B"])


def test_summary_rows():
    rows = summary_rows({"x": {"dice": 0.3}, "y": {}}, ["dice", "hd95"])
    assert rows == [
        {"method": "x", "dice": 0.3, "hd95": None},
        {"method": "y", "dice": None, "hd95": None},
    ]


def test_write_csv_and_text(tmp_path):
    rows = [{"pair": "a", "dice": 0.5}, {"pair": "b", "dice": 0.75, "extra": 1}]
    path = write_csv(rows, tmp_path / "pairs.csv")
    with open(path) as fh:
        read = list(csv.DictReader(fh))
    assert [r["pair"] for r in read] == ["a", "b"]
    assert float(read[1]["dice"]) == 0.75 and "extra" not in read[1]
    write_text("hello\n", tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == "hello\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    with pytest.raises(ValueError, match="empty"):
        write_csv([], tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="output folder"):
        write_text("x", tmp_path / "missing" / "x.md")
