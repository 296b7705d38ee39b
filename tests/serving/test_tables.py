"""Feature tables of the service: histories held flat, served as ``[1, L]``."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.contract import NULL_STRING, RawInput
from serving.model import FeatureTable


def test_histories_are_held_flat_and_served_right_aligned(tmp_path: Path) -> None:
    path = tmp_path / "users.parquet"
    pl.DataFrame(
        {
            "user_id": [3, 1, 2],
            "history": [["a", "b", "c", "d"], None, ["x"]],
            "age": [30, 40, None],
        }
    ).write_parquet(path)
    columns = [RawInput("history", "user", "string", 3), RawInput("age", "user", "float64")]
    table = FeatureTable(path, "user_id", columns)
    values, offsets = table.sequences["history"]
    assert values.tolist() == ["x", "b", "c", "d"] and offsets.tolist() == [0, 0, 1, 4]
    rows, found = table.lookup([3, 1, 2])
    assert found.all()
    got = [table.sequence(columns[0], int(r)).tolist() for r in rows]
    assert got == [
        [["b", "c", "d"]],  # the most recent three
        [[NULL_STRING] * 3],  # no history
        [[NULL_STRING, NULL_STRING, "x"]],
    ]
    assert "history" not in table.values and table.values["age"].tolist()[2] == 30.0
    # Many rows at once (an uplift request's users) equal the rows one by one; a user not in
    # the table has no history.
    rows, found = table.lookup([2, 7, 3, 1])
    many = table.sequence_rows(columns[0], rows, found)
    assert many.tolist() == [
        [NULL_STRING, NULL_STRING, "x"],
        [NULL_STRING] * 3,
        ["b", "c", "d"],
        [NULL_STRING] * 3,
    ]
