"""Derived histories (features/history.py) against a brute-force reference, row by row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from features.config import ConfigError, DatasetConfig
from features.history import latest_histories
from features.source import LogSource


def random_log(rows: int = 3_000, users: int = 25, seed: int = 0) -> pl.DataFrame:
    """Coarse timestamps (many ties in time, within and across users), unsorted rows, null
    labels and a null timestamp."""
    rng = np.random.default_rng(seed)
    day = rng.integers(1, 4, rows)
    frame = pl.DataFrame(
        {
            "user_id": rng.integers(0, users, rows),
            "item_id": rng.integers(0, 60, rows),
            "author_id": rng.integers(0, 9, rows),
            "ts": (day * 100 + rng.integers(0, 40, rows)).astype(np.int64),
            "date": day.astype(np.int64),
            "click": rng.random(rows) < 0.4,
            "like": pl.Series(rng.integers(0, 2, rows).astype(np.int8)),
        }
    )
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 5)
        .then(None)
        .otherwise(pl.col("like"))
        .alias("like"),
        pl.when(pl.int_range(pl.len()) == 11).then(None).otherwise(pl.col("ts")).alias("ts"),
    )
    return frame


def write(frame: pl.DataFrame, directory: Path, files: int = 3, group: int = 250) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(frame.height), files)):
        frame[part].write_parquet(directory / f"part-{i}.parquet", row_group_size=group)
    return directory


def config(tmp: Path, log: Path, **overrides: object) -> DatasetConfig:
    history = {
        "name": "history",
        "kind": "sequence",
        "side": "user",
        "vocabulary_of": "item_id",
        "from_label": "click",
        "timestamp": "ts",
        "max_len": 5,
        **overrides,
    }
    raw = {
        "name": "t",
        "path": str(log),
        "user_key": "user_id",
        "item_key": "item_id",
        "time_column": "date",
        "split": {"train_end": 1, "val_end": 2, "test_end": 3},
        "features": [
            {"name": "user_id", "kind": "categorical", "side": "user"},
            {"name": "item_id", "kind": "categorical", "side": "item"},
            {"name": "author_id", "kind": "categorical", "side": "item", "embedding_dim": 8},
            history,
            {**history, "name": "authors", "vocabulary_of": "author_id"},
        ],
        "tasks": [{"name": "like", "label": "like", "group": "g"}],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return DatasetConfig.from_yaml(path)


def reference(frame: pl.DataFrame, value: str, label: str, max_len: int) -> list[list[int]]:
    """Per row, by definition: the user's positives strictly earlier in time, most recent
    last (ties of time in the log's order), the last ``max_len``."""
    rows = frame.with_row_index("i").to_dicts()
    out = []
    for row in rows:
        if row["ts"] is None or row["user_id"] is None:
            out.append([])
            continue
        earlier = [
            r
            for r in rows
            if r["user_id"] == row["user_id"]
            and r["ts"] is not None
            and r["ts"] < row["ts"]
            and r[label] == 1
        ]
        earlier.sort(key=lambda r: (r["ts"], r["i"]))
        out.append([r[value] for r in earlier][-max_len:] if earlier else [])
    return out


def derived(source: LogSource, column: str) -> list[list[int]]:
    frame = source._scan(derived=True).select(column).collect()
    return [list(v) for v in frame[column].to_list()]


@pytest.mark.parametrize("bucket_rows", [1_000_000, 700])  # one bucket; several
def test_derived_history_matches_brute_force(tmp_path: Path, bucket_rows: int, monkeypatch) -> None:
    frame = random_log()
    log = write(frame, tmp_path / "log")
    monkeypatch.setattr("features.history.BUCKET_ROWS", bucket_rows)
    source = LogSource(config(tmp_path, log), history_cache=tmp_path / "cache")
    # The rows in the order the source reads them (file by file) is the log's order.
    assert derived(source, "history") == reference(frame, "item_id", "click", 5)
    assert derived(source, "authors") == reference(frame, "author_id", "click", 5)


def test_history_never_holds_the_impression_or_later(tmp_path: Path) -> None:
    frame = random_log(seed=3)
    log = write(frame, tmp_path / "log", files=1)
    source = LogSource(config(tmp_path, log, max_len=1000), history_cache=tmp_path / "c")
    got = source._scan(derived=True).select("user_id", "ts", "history").collect()
    clicks = frame.filter(pl.col("click")).group_by("user_id").agg(pl.col("ts").drop_nulls())
    first_click = dict(
        zip(clicks["user_id"], [min(t) for t in clicks["ts"].to_list()], strict=True)
    )
    # A user's first click never sees itself.
    for user, ts in first_click.items():
        rows = got.filter((pl.col("user_id") == user) & (pl.col("ts") == ts))
        assert all(len(h) == 0 for h in rows["history"].to_list())


def test_sidecars_keep_row_groups_and_are_cached(tmp_path: Path) -> None:
    log = write(random_log(), tmp_path / "log")
    cfg = config(tmp_path, log)
    source = LogSource(cfg, history_cache=tmp_path / "cache")
    for file, sidecar in source.sidecars.items():
        a, b = pq.read_metadata(file), pq.read_metadata(sidecar)
        assert [a.row_group(g).num_rows for g in range(a.num_row_groups)] == [
            b.row_group(g).num_rows for g in range(b.num_row_groups)
        ]
    stamp = {p: p.stat().st_mtime_ns for p in source.sidecars.values()}
    again = LogSource(cfg, history_cache=tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in again.sidecars.values()} == stamp
    # A piece reads its rows' histories from the same row group of the sidecar.
    piece = source.pieces[5]
    columns = ("user_id", "ts", "history")
    whole = source._scan(derived=True).select(columns).collect()
    offset = sum(p.rows for p in source.pieces[:5])
    assert source.read_piece_columns(piece, columns).equals(whole[offset : offset + piece.rows])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocabulary_of": "nope"}, r"history\): vocabulary_of: 'nope' names no categorical"),
        ({"max_len": 0}, r"max_len must be >= 1"),
        ({"timestamp": None}, r"timestamp: a history derived from 'click' needs"),
        ({"side": "item"}, r"a sequence is a user or context feature"),
        ({"side": "context"}, r"side: a history derived from the log is a user feature"),
        ({"pooling": "max"}, r"pooling: 'max' is not one of"),
        ({"target": "item_id"}, r"target is only for pooling: target_attention"),
        ({"min_count": 3}, r"min_count does not apply to a sequence"),
        ({"embedding_dim": 4}, r"shares the embeddings of .item_id. \(16\); leave it out"),
        ({"target": "user_id", "pooling": "target_attention"}, r"embeds in 16 dimensions"),
    ],
)
def test_bad_sequence_configs(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config(tmp_path, tmp_path, **overrides)
    assert "config.yaml" in str(err.value)


def test_bad_timestamp_and_list_columns(tmp_path: Path) -> None:
    frame = random_log(300)
    log = write(frame.with_columns(pl.col("ts").cast(pl.String)), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"timestamp column 'ts' .* is String"):
        LogSource(config(tmp_path, log), history_cache=tmp_path / "c")
    log = write(
        frame.with_columns(pl.concat_list(pl.col("item_id").cast(pl.String)).alias("listed")),
        tmp_path / "b",
    )
    raw = config(tmp_path, log)
    specs = [
        s
        if s.kind != "sequence"
        else s.__class__(
            **{**s.__dict__, "from_label": None, "timestamp": None, "column": "listed"}
        )
        for s in raw.features
    ]
    bad = raw.__class__(**{**raw.__dict__, "features": tuple(specs)})
    with pytest.raises(ConfigError, match=r"'listed' .* holds String, but its vocabulary_of"):
        LogSource(bad, history_cache=tmp_path / "c")


def test_logged_list_columns_in_the_log_and_a_side_table(tmp_path: Path) -> None:
    """A history logged as a list column (of the log, or of a user table) is kept as logged:
    the most recent ``max_len`` right-aligned, ids through the shared vocabulary."""
    frame = random_log(2_000).drop_nulls("ts")
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 9, frame.height)
    flat = rng.integers(0, 80, int(lengths.sum()))  # ids 60..79 are never candidates: unknown
    lists = np.split(flat, np.cumsum(lengths)[:-1])
    frame = frame.with_columns(pl.Series("watched", [list(x) for x in lists]))
    users = pl.DataFrame(
        {"user_id": np.arange(25), "follows": [list(range(u % 4)) for u in range(25)]}
    )
    log = write(frame, tmp_path / "log")
    users.write_parquet(tmp_path / "users.parquet")
    config(tmp_path, log)  # writes config.yaml, edited below
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["features"] = [
        *raw["features"][:3],
        {"name": "watched", "kind": "sequence", "side": "user", "vocabulary_of": "item_id",
         "max_len": 5},
        {"name": "follows", "kind": "sequence", "side": "user", "vocabulary_of": "author_id",
         "max_len": 2, "pooling": "target_attention", "target": "author_id"},
    ]  # fmt: skip
    raw["side_tables"] = [{"path": str(tmp_path / "users.parquet"), "key": "user"}]
    (tmp_path / "listed.yaml").write_text(yaml.safe_dump(raw))
    from features.datamodule import RankerDataModule

    dm = RankerDataModule(str(tmp_path / "listed.yaml"), history_cache=str(tmp_path / "c"))
    assert not dm.source.sidecars  # nothing to derive
    rows = dm.source.scan("train").collect()
    batch = dm.state.transform(rows)
    items = dict(zip(dm.state.categorical[1].values, range(1, 10**6), strict=False))
    for i, history in enumerate(rows["watched"].to_list()[:200]):
        kept = [items.get(v, 0) for v in history[-5:]]
        assert batch.sequences["watched"][i].tolist() == [0] * (5 - len(kept)) + kept
        assert batch.lengths["watched"][i] == len(history)
    authors = dict(zip(dm.state.categorical[2].values, range(1, 100), strict=False))
    for i, user in enumerate(rows["user_id"].to_list()[:50]):
        kept = [authors.get(v, 0) for v in list(range(user % 4))[-2:]]
        assert batch.sequences["follows"][i].tolist() == [0] * (2 - len(kept)) + kept
    spec = dm.input_spec
    assert [s.name for s in spec.sequences] == ["watched", "follows"]
    assert spec.sequences[1].target == "author_id" and spec.sequences[0].target is None
    first = next(iter(dm.dataset("train")))
    assert first.sequences["watched"].shape == (len(first), 5)


def test_empty_files_and_row_groups_get_empty_sidecars(tmp_path: Path) -> None:
    """A log file with a 0-row row group (pyarrow writes one for an empty table) and one with
    no row group at all: sidecars of the same layout and the histories' value type."""
    frame = random_log(600).with_columns(pl.col("item_id").cast(pl.String))
    log = write(frame, tmp_path / "log", files=2)
    empty = frame.clear().to_arrow()
    pq.write_table(empty, log / "part-8.parquet")  # one row group of 0 rows
    pq.ParquetWriter(log / "part-9.parquet", empty.schema).close()  # no row group
    assert pq.read_metadata(log / "part-8.parquet").num_row_groups == 1
    cfg = config(tmp_path, log)
    source = LogSource(cfg, history_cache=tmp_path / "cache")
    got = source._scan(derived=True).select("history").collect()["history"]
    assert got.dtype == pl.List(pl.String) and len(got) == frame.height
    assert derived(source, "history") == [
        [str(v) for v in h]
        for h in reference(
            frame.with_columns(pl.col("item_id").cast(pl.Int64)), "item_id", "click", 5
        )
    ]


def test_the_latest_history_is_what_an_impression_after_the_log_derives(tmp_path: Path) -> None:
    """The service's snapshot (``latest_histories``) and training's per-impression rule agree:
    one more impression per user after the whole log derives exactly the snapshot."""
    frame = random_log(seed=5)
    users = frame["user_id"].unique().sort()
    after = pl.DataFrame(
        {
            "user_id": users,
            "item_id": pl.Series([0] * len(users), dtype=frame["item_id"].dtype),
            "author_id": pl.Series([0] * len(users), dtype=frame["author_id"].dtype),
            "ts": pl.Series([10**6] * len(users), dtype=pl.Int64),
            "date": pl.Series([3] * len(users), dtype=pl.Int64),
            "click": [False] * len(users),
            "like": pl.Series([0] * len(users), dtype=frame["like"].dtype),
        }
    )
    log = write(pl.concat([frame, after]), tmp_path / "log", files=1)
    cfg = config(tmp_path, log)
    source = LogSource(cfg, history_cache=tmp_path / "cache")
    got = source._scan(derived=True).filter(pl.col("ts") == 10**6).collect().sort("user_id")
    specs = [s for s in cfg.sequences if s.derived]
    values = [cfg.feature(s.vocabulary_of).column for s in specs]
    latest = pl.concat(
        [
            h.collect().sort("user_id")
            for h in latest_histories(frame.lazy(), "user_id", specs, values)
        ],
        how="align",
    )
    snapshot = dict(zip(latest["user_id"], latest.select("history", "authors").rows(), strict=True))
    for user, history, authors in got.select("user_id", "history", "authors").iter_rows():
        expected = snapshot.get(user, ([], []))
        assert (list(history), list(authors)) == (list(expected[0]), list(expected[1]))
    assert sum(len(h) for h in got["history"].to_list()) > 50  # real histories compared


def test_a_longer_max_len_reuses_the_events_and_positions(tmp_path: Path) -> None:
    """Histories are stored as events once and positions per impression: a longer ``max_len``
    derives nothing again (same files, untouched) and still gives the reference histories;
    the sidecars hold two ints per impression whatever L is."""
    frame = random_log()
    log = write(frame, tmp_path / "log")
    short = LogSource(config(tmp_path, log, max_len=5), history_cache=tmp_path / "cache")
    stamp = {p: p.stat().st_mtime_ns for p in short.sidecars.values()}
    long = LogSource(config(tmp_path, log, max_len=1000), history_cache=tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in long.sidecars.values()} == stamp
    assert derived(long, "history") == reference(frame, "item_id", "click", 1000)
    assert max(len(h) for h in derived(long, "history")) > 5  # the longer L is used
    sidecar = pq.read_schema(next(iter(long.sidecars.values())))
    assert str(sidecar.field("history").type) == "struct<end: int64, n: int64>"
    events = pq.read_metadata(long.events.directory / "events-0.parquet").num_rows
    assert events == int(frame.filter(pl.col("click") & pl.col("ts").is_not_null()).height)


def test_batches_slice_the_events_as_the_reference_gives(tmp_path: Path) -> None:
    """The DataModule's batches carry positions and slice the events when cut: the histories
    are exactly the lists' (which match the brute-force reference above), for every split,
    across row groups and files; a position shifted by one would not be."""
    frame = random_log(seed=7)
    log = write(frame, tmp_path / "log")
    config(tmp_path, log, max_len=7)
    from features.datamodule import RankerDataModule

    dm = RankerDataModule(str(tmp_path / "config.yaml"), batch_size=97, eval_batch_size=61,
                          history_cache=str(tmp_path / "c"))  # fmt: skip
    for split in ("val", "test"):
        lists = dm.state.transform(dm.source.scan(split).collect())
        batches = list(dm.dataset(split))
        for name in ("history", "authors"):
            got = np.concatenate([b.sequences[name].numpy() for b in batches])
            np.testing.assert_array_equal(got, lists.sequences[name])
            # Lengths count all of the user's earlier events (the lists hold the last L).
            lengths = np.concatenate([b.lengths[name].numpy() for b in batches])
            np.testing.assert_array_equal(np.minimum(lengths, 7), lists.lengths[name])
            assert lengths.max() > 7
        assert (lists.sequences["history"] > 0).sum() > 100  # real histories compared
    # A mutation that shifts every position by one gives other histories.
    piece = dm.source.pieces[-1]
    rows = dm.source.read_piece(piece, "test", positions=True)
    batch = dm.state.transform(rows, dm.source.events)
    slices = batch.sequences["history"]
    shifted = slices.__class__(slices.events, slices.end - 1, slices.count, slices.max_len)
    exact = dm.state.transform(dm.source.read_piece(piece, "test")).sequences["history"]
    np.testing.assert_array_equal(slices.ids(), exact)
    assert (shifted.ids() != exact).any()
    # Training batches are shuffled slices of the same events: every row's history is one
    # of the split's, and lengths agree with what the history holds.
    train = dm.state.transform(dm.source.scan("train").collect())
    known = {tuple(r) for r in train.sequences["history"].tolist()}
    for b in dm.dataset("train"):
        ids = b.sequences["history"].numpy()
        assert {tuple(r) for r in ids.tolist()} <= known
        assert ((ids > 0).sum(1) <= b.lengths["history"].numpy()).all()


def test_event_slices_cut_and_join_like_the_ids() -> None:
    from features.history import EventSlices

    events = np.arange(1, 21, dtype=np.int64)
    s = EventSlices(events, np.array([0, 3, 20, 10]), np.array([0, 3, 4, 1]), 4)
    np.testing.assert_array_equal(
        s.ids(), [[0, 0, 0, 0], [0, 1, 2, 3], [17, 18, 19, 20], [0, 0, 0, 10]]
    )
    index = np.array([3, 1])
    np.testing.assert_array_equal(s[index].ids(), s.ids()[index])
    np.testing.assert_array_equal(EventSlices.concat([s[2:], s[:2]]).ids(), s.ids()[[2, 3, 0, 1]])
    other = EventSlices(events.copy(), s.end, s.count, 4)
    with pytest.raises(ValueError, match="different events"):
        EventSlices.concat([s, other])


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ({"search_k": 3}, r"search_k is only for pooling: search"),
        ({"search_by": "authors"}, r"search_by is only for pooling: search"),
        ({"pooling": "search", "search_k": 0}, r"search_k must be >= 1"),
        ({"pooling": "search", "search_by": "nope"}, r"search_by: 'nope' names no other sequence"),
        ({"pooling": "search", "search_by": "history"}, r"'history' names no other sequence"),
        (
            {"pooling": "search", "search_by": "authors", "max_len": 9},
            r"'authors' is not aligned with 'history'",
        ),
        ({"target": "author_id"}, r"target is only for pooling: target_attention or search"),
        ({"pooling": "none"}, r"pooling: none is for a sequence another one searches by"),
    ],
)
def test_bad_search_configs(tmp_path: Path, history: dict, message: str) -> None:
    config(tmp_path, tmp_path)  # writes config.yaml, edited below
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["features"][3].update(history)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        DatasetConfig.from_yaml(tmp_path / "config.yaml")
    raw["features"][3] |= {"pooling": "search", "search_k": 3, "search_by": "authors"}
    raw["features"][3] |= {"max_len": 5, "target": "item_id"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert DatasetConfig.from_yaml(tmp_path / "config.yaml").feature("history").search_k == 3
