"""FeatureState: fitting, transforming and saving, on small hand-made frames."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.config import DatasetConfig
from features.state import CategoricalState, FeatureState


def make_config(**overrides: object) -> DatasetConfig:
    raw = {
        "name": "t",
        "path": "log.parquet",
        "user_key": "user",
        "item_key": "item",
        "time_column": "day",
        "split": {"train_end": 1, "val_end": 2},
        "features": [
            {"name": "user", "kind": "categorical", "side": "user"},
            {"name": "city", "kind": "categorical", "side": "user", "min_count": 2},
            {"name": "top", "column": "item", "kind": "categorical", "side": "item", "max_size": 2},
            {"name": "age", "kind": "numeric", "side": "user", "transform": "standardize"},
            {"name": "views", "kind": "numeric", "side": "item", "transform": "log1p"},
            {
                "name": "price",
                "kind": "numeric",
                "side": "item",
                "transform": "quantile_bucket",
                "buckets": 4,
            },
        ],
        "tasks": [
            {"name": "click", "label": "click", "group": "watch"},
            {"name": "like", "label": "like", "group": "interaction", "weight": 2.0},
        ],
    }
    raw.update(overrides)
    return DatasetConfig.from_dict(raw, source=Path("/tmp/config.yaml"))


TRAIN = pl.DataFrame(
    {
        "user": [10, 10, 11, 12, 12, 12],
        "item": ["a", "b", "a", "c", "a", "b"],
        "city": ["x", "x", "y", None, "x", "z"],
        "age": [20.0, 20.0, 30.0, None, 40.0, 40.0],
        "views": [0.0, 9.0, 99.0, 999.0, None, -5.0],
        "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "click": [1, 0, None, 1, 0, 1],
        "like": [0, 0, 1, None, 0, 0],
    }
)


@pytest.fixture()
def state() -> FeatureState:
    return FeatureState.fit(TRAIN.lazy(), make_config())


def test_vocabularies_fold_rare_values_and_keep_the_most_frequent(state: FeatureState) -> None:
    vocab = {s.name: s.values for s in state.categorical}
    assert vocab["user"] == [12, 10, 11]  # by count, ties by value
    assert vocab["city"] == ["x"]  # y and z are seen once: below min_count=2
    assert vocab["top"] == ["a", "b"]  # max_size=2 keeps the two most frequent
    assert [s.cardinality for s in state.categorical] == [4, 2, 3]


def test_numeric_statistics(state: FeatureState) -> None:
    age, views, price = state.numeric
    assert age.mean == pytest.approx(30.0)
    assert age.std == pytest.approx(np.std([20, 20, 30, 40, 40], ddof=1))
    logs = np.log1p([0.0, 9.0, 99.0, 999.0, 0.0])  # negatives clip to 0 before log1p
    assert views.mean == pytest.approx(logs.mean())
    assert price.boundaries == sorted(set(price.boundaries)) and len(price.boundaries) == 3


def test_transform_maps_unknowns_and_nulls_to_zero(state: FeatureState) -> None:
    frame = pl.DataFrame(
        {
            "user": [10, 99, None],
            "item": ["a", "zzz", "c"],
            "city": ["x", "y", "never-seen"],
            "age": [30.0, None, float("inf")],
            "views": [9.0, 0.0, 1e6],
            "price": [0.0, 3.5, None],
            "click": [1, None, 0],
            "like": [None, 1, 0],
        }
    )
    batch = state.transform(frame)
    assert batch.cat.dtype == np.int64 and batch.num.dtype == np.float32
    assert batch.labels.dtype == np.float32
    # columns: user, city, top, then the bucketised price
    np.testing.assert_array_equal(batch.cat[:, 0], [2, 0, 0])
    np.testing.assert_array_equal(batch.cat[:, 1], [1, 0, 0])
    np.testing.assert_array_equal(batch.cat[:, 2], [1, 0, 0])
    assert batch.cat[0, 3] == 1 and batch.cat[2, 3] == 0  # below the first boundary; missing
    # age: standardised, missing / infinite -> 0 (the mean)
    assert batch.num[0, 0] == pytest.approx(0.0)
    assert batch.num[1, 0] == 0.0 and batch.num[2, 0] == 0.0
    assert math.isnan(batch.labels[1, 0]) and math.isnan(batch.labels[0, 1])
    assert batch.labels[0, 0] == 1.0 and batch.labels[2, 1] == 0.0
    np.testing.assert_array_equal(batch.users[:2], [10, 99])


def test_string_user_keys_hash_to_int64() -> None:
    config = make_config(features=[{"name": "user", "kind": "categorical", "side": "user"}])
    frame = TRAIN.with_columns(pl.col("user").cast(pl.String))
    state = FeatureState.fit(frame.lazy(), config)
    users = state.transform(frame).users
    assert users.dtype == np.int64
    assert users[0] == users[1] and users[0] != users[2]


def test_save_and_load_round_trip(
    state: FeatureState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("features.state.INLINE_VOCAB_LIMIT", 2)  # force the Parquet path
    state.save(tmp_path)
    assert (tmp_path / "vocab_user.parquet").exists()
    loaded = FeatureState.load(tmp_path)
    a, b = state.transform(TRAIN), loaded.transform(TRAIN)
    for name in ("cat", "num", "labels", "users"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert loaded.input_spec(make_config().features) == state.input_spec(make_config().features)


def test_input_spec_layout(state: FeatureState) -> None:
    spec = state.input_spec(make_config().features)
    assert spec.cat_names == ("user", "city", "top", "price")
    assert spec.cardinalities == (4, 2, 3, 5)
    assert spec.num_names == ("age", "views")


def test_fit_with_only_categorical_features() -> None:
    config = make_config(features=[{"name": "user", "kind": "categorical", "side": "user"}])
    state = FeatureState.fit(TRAIN.lazy(), config)
    assert state.numeric == []
    assert state.categorical[0].values == [12, 10, 11]  # most frequent first, ties by value


def test_unseen_shares_count_unknown_and_missing_ids_and_leave_hashed_ones_unmeasured() -> None:
    state = FeatureState(
        [
            CategoricalState("item", "item_col", "int", [10, 11, 12]),
            CategoricalState("author", "author_col", "int", [], hash_buckets=8),
        ],
        [],
        [],
        "user",
    )
    frame = pl.LazyFrame({"item_col": [10, 99, None, 11], "author_col": [1, 2, None, 3]})
    both = ("item", "author")
    assert state.unseen_shares(frame, both) == (0.5, None)  # 99 unseen, None missing; hashed
    assert state.unseen_shares(frame, ()) == (None, None)  # only the features asked for
    assert FeatureState([], [], [], "user").unseen_shares(frame, both) == ()  # none embedded
