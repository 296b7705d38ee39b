"""Pre-split data (a path per split) and a split column give the splits a time split gives."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest
import yaml

from features.config import ConfigError, DatasetConfig
from features.datamodule import RankerDataModule
from tests.conftest import SYNTHETIC_CONFIG

DAYS = {"train": "2024-01-12", "val": "2024-01-13"}


def split_of(date: pl.Expr) -> pl.Expr:
    return (
        pl.when(date <= DAYS["train"])
        .then(pl.lit("train"))
        .when(date <= DAYS["val"])
        .then(pl.lit("val"))
        .otherwise(pl.lit("test"))
    )


def config_with(tmp: Path, name: str, **changes: object) -> Path:
    raw = yaml.safe_load(SYNTHETIC_CONFIG.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def by_time(tiny_log: Path) -> RankerDataModule:
    return RankerDataModule(str(SYNTHETIC_CONFIG), log_path=str(tiny_log))


def rows(dm: RankerDataModule, split: str) -> pl.DataFrame:
    """The split's rows as the DataModule reads them (row groups), in a comparable order."""
    frames = [dm.source.read_piece(p, split, ("ts",)) for p in dm.split_pieces[split][0]]
    columns = ["user_id", "item_id", "ts", "click", "recent_clicks"]
    return pl.concat(frames).select(columns).sort(["ts", "user_id", "item_id"])


def test_a_path_per_split_gives_the_time_splits(
    tiny_log: Path, tmp_path: Path, by_time: RankerDataModule
) -> None:
    log = pl.read_parquet(tiny_log, hive_partitioning=True)
    log = log.with_columns(split_of(pl.col("date").cast(pl.String)).alias("split"))
    for split in ("train", "val", "test"):
        part = log.filter(pl.col("split") == split).drop("split", "date")
        (tmp_path / split).mkdir()
        for i, chunk in enumerate(part.iter_slices(7_000)):  # several files a split
            chunk.write_parquet(tmp_path / split / f"part-{i}.parquet", row_group_size=1_000)
    path = config_with(
        tmp_path,
        "presplit",
        path=None,
        time_column=None,
        split={s: str(tmp_path / s) for s in ("train", "val", "test")},
    )
    dm = RankerDataModule(str(path))
    assert dm.split_rows == by_time.split_rows
    for split in ("train", "val", "test"):
        assert rows(dm, split).equals(rows(by_time, split)), split
    batches = list(dm.dataset("val"))
    assert sum(len(b) for b in batches) == dm.split_rows["val"]
    with pytest.raises(ConfigError, match="a log_path does not apply"):
        RankerDataModule(str(path), log_path=str(tiny_log))


def test_a_split_column_gives_the_time_splits(
    tiny_log: Path, tmp_path: Path, by_time: RankerDataModule
) -> None:
    log = pl.read_parquet(tiny_log, hive_partitioning=True)
    log = log.with_columns(split_of(pl.col("date").cast(pl.String)).alias("which"))
    log = log.with_columns(
        pl.when(pl.int_range(pl.len()) % 500 == 0).then(pl.lit("holdout")).otherwise("which")
    )  # rows no split takes: counted, not trained on
    log.drop("date").write_parquet(tmp_path / "log.parquet", row_group_size=1_000)
    path = config_with(
        tmp_path,
        "column",
        path=str(tmp_path / "log.parquet"),
        time_column=None,
        split={"column": "which"},
    )
    dm = RankerDataModule(str(path))
    outside = (log["which"] == "holdout").sum()
    assert sum(dm.split_rows.values()) == log.height - outside
    assert dm.split_rows["train"] == log.filter(pl.col("which") == "train").height
    assert rows(dm, "test").height == dm.split_rows["test"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"split": {"column": "which", "train_end": 3}}, r"split: give one of"),
        ({"split": {"train": "a", "val": "b"}}, r"missing the path of \['test'\]"),
        ({"split": {"train": "a", "val": "b", "test": "c"}}, r"path: the split names a path"),
        ({"split": {"train_end": "2024-01-12"}}, r"a time split needs train_end and val_end"),
        ({"time_column": None}, r"missing required key 'time_column'"),
        ({"path": None}, r"missing required key 'path'"),
    ],
)
def test_bad_splits_name_the_file_and_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        DatasetConfig.from_yaml(config_with(tmp_path, "bad", **changes))
    assert "bad.yaml" in str(err.value)


def test_every_row_of_the_log_is_accounted_for(tiny_log: Path, tmp_path: Path) -> None:
    """Planted: 10% of the rows with a null time, 5% after the test end. Each is counted with
    its reason, the split rows and observed labels add up, and max_unassigned stops the run."""
    frame = pl.read_parquet(tiny_log, hive_partitioning=True)
    row = pl.int_range(pl.len())
    frame = frame.with_columns(
        pl.when(row % 10 == 0)
        .then(None)
        .when(row % 20 == 1)
        .then(pl.date(2024, 2, 1))
        .otherwise(pl.col("date"))
        .alias("date")
    )
    path = tmp_path / "log.parquet"
    frame.write_parquet(path, row_group_size=5_000)
    data = RankerDataModule(str(SYNTHETIC_CONFIG), log_path=str(path))
    accounting = data.accounting
    assert accounting["rows"].sum() == len(frame)
    none = dict(accounting.filter(pl.col("split") == "none").select("reason", "rows").iter_rows())
    assert none == {
        "null time ('date')": frame["date"].null_count(),
        "after the test end 2024-01-14": (frame["date"] > date(2024, 1, 14)).sum(),
    }
    assert sum(data.split_rows.values()) == len(frame) - sum(none.values())
    train = accounting.filter(pl.col("split") == "train")
    in_train = frame.filter(pl.col("date") <= date(2024, 1, 12))
    assert train["click"].item() == in_train["click"].is_not_null().sum()
    with pytest.raises(ConfigError, match=r"are in no split \(.*null time.*\): more than"):
        RankerDataModule(str(SYNTHETIC_CONFIG), log_path=str(path), max_unassigned=0.1)
