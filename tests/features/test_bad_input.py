"""Every bad input of the contract gets one clear error before any training starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from features.config import ConfigError, DatasetConfig
from features.datamodule import RankerDataModule
from features.source import LogSource
from tests.conftest import KUAIRAND_CONFIG, SYNTHETIC_CONFIG


def write_config(tmp_path: Path, log: Path, **changes: object) -> Path:
    raw = yaml.safe_load(SYNTHETIC_CONFIG.read_text())
    raw["path"] = str(log)
    raw.update(changes)
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def copy_log(tiny_log: Path, tmp_path: Path) -> Path:
    target = tmp_path / "log"
    shutil.copytree(tiny_log, target)
    return target


def first_file(log: Path) -> Path:
    return sorted(log.rglob("*.parquet"))[0]


def test_missing_log(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"behaviour log .*nowhere does not exist"):
        RankerDataModule(str(config))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset config .*absent.yaml does not exist"):
        RankerDataModule(str(tmp_path / "absent.yaml"))


def test_missing_column_names_the_column_and_the_file(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    for file in log.rglob("*.parquet"):
        pl.read_parquet(file).drop("item_category").write_parquet(file)
    config = write_config(tmp_path, log)
    with pytest.raises(ConfigError) as err:
        RankerDataModule(str(config))
    message = str(err.value)
    assert "'item_category'" in message and "feature 'item_category'" in message
    assert str(first_file(log)) in message


def test_missing_label_column(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    for file in log.rglob("*.parquet"):
        pl.read_parquet(file).drop("comment").write_parquet(file)
    with pytest.raises(ConfigError, match=r"column 'comment' \(label of task 'comment'\)"):
        RankerDataModule(str(write_config(tmp_path, log)))


def test_label_outside_0_1_null(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    file = first_file(log)
    frame = pl.read_parquet(file)
    frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(2)
        .otherwise(pl.col("like"))
        .cast(pl.Int8)
        .alias("like")
    ).write_parquet(file)
    with pytest.raises(ConfigError, match=r"label column 'like' .* 1 value\(s\) outside"):
        RankerDataModule(str(write_config(tmp_path, log)))


def test_null_labels_are_accepted(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    file = first_file(log)
    frame = pl.read_parquet(file)
    frame.with_columns(
        pl.when(pl.col("click") == 0).then(None).otherwise(pl.col("like")).alias("like")
    ).write_parquet(file)
    RankerDataModule(str(write_config(tmp_path, log)))


def test_string_labels_are_refused(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    for file in log.rglob("*.parquet"):
        pl.read_parquet(file).with_columns(pl.col("follow").cast(pl.String)).write_parquet(file)
    with pytest.raises(ConfigError, match=r"label column 'follow' .* expected 0/1"):
        RankerDataModule(str(write_config(tmp_path, log)))


def test_empty_split(tiny_log: Path, tmp_path: Path) -> None:
    split = {"train_end": "2024-01-12", "val_end": "2024-01-14", "test_end": "2024-01-20"}
    config = write_config(tmp_path, tiny_log, split=split)
    with pytest.raises(ConfigError, match=r"the test split of .* is empty"):
        RankerDataModule(str(config))


def test_non_parquet_file(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    impostor = log / "date=2024-01-05" / "part-9.parquet"
    impostor.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ConfigError, match=f"{impostor} is not a Parquet file"):
        RankerDataModule(str(write_config(tmp_path, log)))


def test_directory_without_parquet(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no Parquet files"):
        RankerDataModule(str(write_config(tmp_path, tmp_path / "empty")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"featurs": []}, r"unknown key\(s\) \['featurs'\]"),
        ({"split": {"train_end": 1, "val_end": 2, "tset_end": 3}}, r"split: unknown key"),
        (
            {"tasks": [{"name": "c", "label": "click", "group": "w", "wieght": 1}]},
            r"tasks\[0\]: unknown key\(s\) \['wieght'\]",
        ),
        (
            {"features": [{"name": "u", "kind": "categorcal", "side": "user"}]},
            r"features\[0\]: kind: 'categorcal' is not one of",
        ),
        (
            {"features": [{"name": "u", "kind": "numeric", "side": "user", "transform": "log"}]},
            r"transform: 'log' is not one of",
        ),
        (
            {
                "features": [
                    {"name": "u", "kind": "categorical", "side": "user", "embedding_dim": "big"}
                ]
            },
            r"embedding_dim: expected int",
        ),
        (
            {"split": {"train_end": "2024-01-14", "val_end": "2024-01-13"}},
            "train_end must come before",
        ),
        ({"tasks": []}, "'tasks' is empty"),
        (
            {"features": [{"name": "u", "kind": "numeric", "side": "user", "hash_buckets": 8}]},
            "hash_buckets is for a categorical feature",
        ),
        (
            {"features": [{"name": "u", "kind": "categorical", "side": "user", "hash_buckets": 0}]},
            "hash_buckets must be >= 1",
        ),
        (
            {
                "features": [
                    {
                        "name": "u",
                        "kind": "categorical",
                        "side": "user",
                        "hash_buckets": 8,
                        "min_count": 2,
                    }
                ]
            },
            "min_count / max_size shape a fitted vocabulary, not hash_buckets",
        ),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, change: dict, message: str) -> None:
    path = write_config(tmp_path, tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as err:
        DatasetConfig.from_yaml(path)
    assert str(path) in str(err.value)


def test_missing_required_key(tmp_path: Path) -> None:
    raw = yaml.safe_load(SYNTHETIC_CONFIG.read_text())
    del raw["user_key"]
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing required key 'user_key'"):
        DatasetConfig.from_yaml(path)


def test_missing_side_table_column(tmp_path: Path) -> None:
    raw = yaml.safe_load(KUAIRAND_CONFIG.read_text())
    raw["features"].append({"name": "nope", "kind": "categorical", "side": "user"})
    path = KUAIRAND_CONFIG.parent / f"_test_{tmp_path.name}.yaml"  # keeps relative data paths
    try:
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=r"column 'nope' .* or the side tables"):
            LogSource(DatasetConfig.from_yaml(path))
    finally:
        path.unlink()


def test_column_missing_from_one_file_names_that_file(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    last = sorted(log.rglob("*.parquet"))[-1]
    pl.read_parquet(last).drop("page").write_parquet(last)
    with pytest.raises(ConfigError) as err:
        RankerDataModule(str(write_config(tmp_path, log)))
    assert "column 'page' (feature 'page')" in str(err.value) and str(last) in str(err.value)


def test_truncated_parquet_file_is_named(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    victim = first_file(log)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] + data[-8:])  # magic intact, footer cut
    with pytest.raises(ConfigError, match=f"{victim} is a corrupt or truncated Parquet file"):
        RankerDataModule(str(write_config(tmp_path, log)))


def test_corrupt_data_pages_are_named_not_a_hang(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    victim = sorted(log.rglob("*.parquet"))[3]
    data = bytearray(victim.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    body = len(data) - footer
    data[4:body] = np.random.default_rng(0).integers(0, 256, body - 4, dtype=np.uint8).tobytes()
    victim.write_bytes(bytes(data))  # the footer still parses; every page is garbage
    with pytest.raises(ConfigError, match=f"cannot read {victim}"):
        RankerDataModule(str(write_config(tmp_path, log)))


def test_corrupt_files_skipped_and_counted_when_asked(tiny_log: Path, tmp_path: Path) -> None:
    log = copy_log(tiny_log, tmp_path)
    files = sorted(log.rglob("*.parquet"))
    truncated, garbled = files[0], files[3]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2] + data[-8:])
    data = bytearray(garbled.read_bytes())
    body = len(data) - int.from_bytes(data[-8:-4], "little") - 8
    data[4:body] = np.random.default_rng(0).integers(0, 256, body - 4, dtype=np.uint8).tobytes()
    garbled.write_bytes(bytes(data))
    config = str(write_config(tmp_path, log))
    with pytest.warns(UserWarning, match="skipped") as caught:
        dm = RankerDataModule(config, skip_corrupt_files=True)
    assert sorted(dm.source.skipped) == sorted([str(truncated), str(garbled)])
    messages = " ".join(str(w.message) for w in caught)
    assert str(truncated) in messages and str(garbled) in messages
    good = [f for f in files if f not in (truncated, garbled)]
    train = dm.source.split_filter("train")
    scan = pl.scan_parquet(good, hive_partitioning=True).filter(train)
    assert dm.split_rows["train"] == scan.select(pl.len()).collect().item()
    batches = list(dm.dataset("train"))
    assert sum(len(b) for b in batches) == dm.split_rows["train"]


def test_hashing_string_ids_is_refused_naming_the_feature(tiny_log: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(SYNTHETIC_CONFIG.read_text())
    raw["path"] = str(tiny_log)
    for feature in raw["features"]:
        if feature["name"] == "user_gender":  # logged as strings
            feature["hash_buckets"] = 8
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"feature 'user_gender': hash_buckets needs integer ids"):
        RankerDataModule(str(path)).state  # noqa: B018 -- fitting the state raises
