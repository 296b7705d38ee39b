"""The feature tables an exported model is served with: per user and per item, the latest
non-missing value of each of its side's columns in the whole log, and each user's derived
histories as a request made after the log would see them (``features.history``'s rule)."""

from __future__ import annotations

import polars as pl

from features.config import SPLITS
from features.contract import ITEM_TABLE, USER_TABLE
from features.datamodule import RankerDataModule
from features.history import latest_histories
from features.onnx_graph import raw_inputs


def feature_snapshots(data: RankerDataModule) -> dict[str, pl.DataFrame]:
    """``{USER_TABLE: frame, ITEM_TABLE: frame}``, each sorted by its key."""
    c = data.config
    inputs = [i for i in raw_inputs(data.state, c.features) if i.name not in data.source.derived]
    derived = [s for s in c.sequences if s.derived]
    values = [c.feature(s.vocabulary_of).column for s in derived]
    extra = [s.column for s in c.sequences if not s.derived]
    for spec, value in zip(derived, values, strict=True):
        extra += [spec.timestamp, spec.from_label, value]
    log = pl.concat(
        [data.source.scan(split, tuple(extra), sequences=False) for split in SPLITS],
        how="vertical_relaxed",
    )
    tables = {}
    for side, key, file in (("user", c.user_key, USER_TABLE), ("item", c.item_key, ITEM_TABLE)):
        columns = [i.name for i in inputs if i.side == side and i.name != key]
        ordered = log.sort(c.time_column, maintain_order=True) if c.time_column else log
        latest = (
            ordered.select([key, *columns])
            .group_by(key, maintain_order=True)
            .agg([pl.col(name).drop_nulls().last() for name in columns])
        )
        if side == "user":
            for history in latest_histories(log, key, derived, values):
                latest = latest.join(history, on=key, how="full", coalesce=True)
        tables[file] = latest.sort(key)
    frames = pl.collect_all(list(tables.values()), engine="streaming")
    return dict(zip(tables, frames, strict=True))
