"""Behaviour histories derived from the log itself: each user's events stored once, each
impression a position in them.

A derived sequence (``kind: sequence`` with ``from_label``) is, for each impression, the values
of a column (e.g. ``item_id``) at the user's last ``max_len`` impressions whose label
``from_label`` is 1, strictly before the impression's ``timestamp``: never the impression
itself, never a later event, never an event at the same timestamp. Sequences with the same
label and timestamp are computed together and aligned by position.

**Storage.** A group's *events* (the positives, sorted by user, then time, then log order) are
written once, one Parquet file per group (``events-<g>.parquet``, a column of values per
sequence). Each impression holds only its *position*: ``end``, the index in the events of the
first positive at or after its time (exclusive), and ``n``, how many of its user's positives
come before it. Its history is ``events[end - min(n, L) : end]``, sliced when a batch is cut
(``EventSlices``), so ``max_len`` can change without deriving again, and disk and memory grow
with the events and the impressions, never with impressions x L:

    disk, memory = 8 B x events x sequences  +  16 B x impressions x sequences

(at L = 1,000 and 10M impressions with 1M positives, 0.2 GB where per-impression lists take
80 GB).

**Pre-pass.** The positions are written once to Parquet *sidecars*, one per log file, row for
row and row group for row group (so the DataModule reads a log row group and its sidecar row
group together), cached under a key of the log files (path, size, mtime) and the specs. The
pass reads the log once and its own files twice, so its time grows linearly:

1. **partition**: one pass over the log, row group by row group, sends each row's narrow
   columns (user, timestamp, label, values) and its key (file, row) to the file of its user's
   bucket (users hashed into ``K`` buckets of about ``bucket_rows`` impressions);
2. **derive**, bucket by bucket (polars + numpy, no per-row Python): the positives sorted by
   (user, time) are appended to the events; an as-of join (backward, exact matches excluded)
   gives each impression the end of its user's positives strictly before it, written sorted
   by key;
3. **assemble**: each log row group's positions are read back from the row groups of the
   buckets' results whose key range meets it (Parquet statistics), sorted, and appended to its
   file's sidecar.

Memory holds one bucket (about ``bucket_rows`` x 56 bytes) and one row group's positions,
whatever the size of the log.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import ConfigError, DatasetConfig, FeatureSpec
from features.contract import right_aligned

BUCKET_ROWS = 1_000_000
MANIFEST = "manifest.json"
FORMAT = 2  # 1: per-impression lists; 2: events once, positions per impression
POSITION = pl.Struct({"end": pl.Int64, "n": pl.Int64})  # a derived column in a sidecar


def ranker_cache() -> Path:
    """Where ranker caches what it derives (histories, compiled code): ``$RANKER_CACHE`` or
    ``~/.cache/ranker``."""
    return Path(os.environ.get("RANKER_CACHE") or Path.home() / ".cache" / "ranker")


def cache_root() -> Path:
    """Where derived histories are cached: ``ranker_cache()/histories``."""
    return ranker_cache() / "histories"


@dataclass(frozen=True)
class HistoryGroup:
    """Derived sequences that share a label and a timestamp: computed together, aligned."""

    label: str
    timestamp: str
    specs: tuple[FeatureSpec, ...]
    values: tuple[str, ...]  # per spec, the column its values come from

    @property
    def max_len(self) -> int:
        return max(s.max_len for s in self.specs)


def history_groups(config: DatasetConfig) -> list[HistoryGroup]:
    groups: dict[tuple[str, str], list[FeatureSpec]] = {}
    for spec in config.sequences:
        if spec.derived:
            groups.setdefault((spec.from_label, spec.timestamp), []).append(spec)
    return [
        HistoryGroup(
            label, ts, tuple(specs), tuple(config.feature(s.vocabulary_of).column for s in specs)
        )
        for (label, ts), specs in groups.items()
    ]


def check_columns(group: HistoryGroup, schema: pl.Schema, where: str) -> None:
    """The label, timestamp and value columns exist in the log and have usable types."""
    for column, role in (
        (group.label, "from_label"),
        (group.timestamp, "timestamp"),
        *(
            (v, f"values of sequence '{s.name}'")
            for v, s in zip(group.values, group.specs, strict=True)
        ),
    ):
        if column not in schema:
            raise ConfigError(
                f"column '{column}' ({role} of a derived history) is missing from {where}"
            )
    label = schema[group.label]
    if not (label.is_numeric() or label == pl.Boolean):
        raise ConfigError(f"from_label column '{group.label}' in {where} is {label}, not 0/1")
    ts = schema[group.timestamp]
    if not (ts.is_numeric() or isinstance(ts, pl.Datetime)):
        raise ConfigError(
            f"timestamp column '{group.timestamp}' in {where} is {ts}: a derived history needs "
            "a number or a datetime of sub-day resolution to order events"
        )


# -- the pre-pass -----------------------------------------------------------------------------


def derive(
    files: list[Path],
    user_key: str,
    groups: list[HistoryGroup],
    schema: pl.Schema,
    root: Path | None = None,
    bucket_rows: int | None = None,
) -> Events:
    """The log's events and the sidecar of each log file (positions, same rows and row
    groups), from the cache or written now; concurrent callers (DDP ranks) wait for one to
    write them."""
    root, bucket_rows = root or cache_root(), bucket_rows or BUCKET_ROWS
    key = _cache_key(files, user_key, groups)
    directory = root / key
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / MANIFEST).exists():
            shutil.rmtree(directory, ignore_errors=True)  # an interrupted earlier pass
            work = directory / "buckets"
            work.mkdir(parents=True)
            _write_sidecars(files, user_key, groups, directory, work, bucket_rows, schema)
            shutil.rmtree(work)
            manifest = {"files": [str(f) for f in files], "groups": _describe(groups)}
            (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Events(directory, groups, [directory / f"{i}.parquet" for i in range(len(files))])


def _describe(groups: list[HistoryGroup]) -> list[dict[str, object]]:
    return [
        {
            "label": g.label,
            "timestamp": g.timestamp,
            "columns": {s.column: v for s, v in zip(g.specs, g.values, strict=True)},
        }
        for g in groups
    ]


def _cache_key(files: list[Path], user_key: str, groups: list[HistoryGroup]) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    doc = json.dumps([FORMAT, stats, user_key, _describe(groups)], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


KEY_SHIFT = 40  # a row's key: file index << 40 | row in the file (files up to 10^12 rows)


def _narrow_columns(user_key: str, groups: list[HistoryGroup]) -> list[str]:
    columns = [user_key]
    for g in groups:
        columns += [g.label, g.timestamp, *g.values]
    return list(dict.fromkeys(columns))


def _write_sidecars(
    files: list[Path],
    user_key: str,
    groups: list[HistoryGroup],
    directory: Path,
    work: Path,
    bucket_rows: int,
    schema: pl.Schema,
) -> None:
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    buckets = max(1, math.ceil(rows / bucket_rows))
    _partition(files, _narrow_columns(user_key, groups), user_key, buckets, work, schema)
    writers = [
        _EventWriter(directory / f"events-{i}.parquet", g, schema) for i, g in enumerate(groups)
    ]
    try:
        for k in range(buckets):
            frame = pl.read_parquet(work / f"in-{k}.parquet")
            derived = frame.select("__key")
            for g, writer in zip(groups, writers, strict=True):
                derived = derived.hstack(_positions(frame, user_key, g, writer).get_columns())
            # Row groups small enough that a log row group reads about one from each bucket.
            group = min(max(65_536 // buckets, 1_024), 65_536)
            derived.sort("__key").write_parquet(work / f"out-{k}.parquet", row_group_size=group)
            (work / f"in-{k}.parquet").unlink()
            del frame, derived
    finally:
        for writer in writers:
            writer.close()
    types = {s.column: POSITION for g in groups for s in g.specs}
    _assemble(files, [work / f"out-{k}.parquet" for k in range(buckets)], types, directory)


class _EventWriter:
    """Appends a group's events, bucket by bucket, to its file; counts them (the next
    bucket's events start there)."""

    def __init__(self, path: Path, group: HistoryGroup, schema: pl.Schema) -> None:
        self.written = 0
        self.empty = pl.DataFrame(
            schema={s.column: schema[v] for s, v in zip(group.specs, group.values, strict=True)}
        )
        self.writer = pq.ParquetWriter(path, self.empty.to_arrow().schema)

    def write(self, events: pl.DataFrame) -> int:
        """Append ``events`` (the group's value columns); returns where they start."""
        start = self.written
        if events.height:
            table = pl.concat([self.empty, events], how="vertical_relaxed").to_arrow()
            self.writer.write_table(table.cast(self.writer.schema))
        self.written += events.height
        return start

    def close(self) -> None:
        self.writer.close()


def _partition(
    files: list[Path],
    columns: list[str],
    user_key: str,
    buckets: int,
    work: Path,
    schema: pl.Schema,
) -> None:
    """One pass over the log, row group by row group: each row's narrow columns and key go to
    its user's bucket file (``in-<k>.parquet``)."""
    types = {c: schema[c] for c in columns}
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for i, file in enumerate(files):
            parquet, offset = pq.ParquetFile(file), 0
            for g in range(parquet.num_row_groups):
                part = pl.from_arrow(parquet.read_row_group(g, columns=columns))
                part = part.select(
                    (pl.int_range(pl.len(), dtype=pl.Int64) + (offset + (i << KEY_SHIFT))).alias(
                        "__key"
                    ),
                    *(pl.col(c).cast(t) for c, t in types.items()),
                ).with_columns((pl.col(user_key).hash(seed=0) % buckets).alias("__bucket"))
                offset += part.height
                for (k,), rows in part.partition_by("__bucket", as_dict=True).items():
                    table = rows.drop("__bucket").to_arrow()
                    if k not in writers:
                        writers[k] = pq.ParquetWriter(work / f"in-{k}.parquet", table.schema)
                    writers[k].write_table(table)
    finally:
        for writer in writers.values():
            writer.close()
    empty = pl.DataFrame(schema={"__key": pl.Int64, **types})
    for k in set(range(buckets)) - set(writers):
        empty.write_parquet(work / f"in-{k}.parquet")


def _assemble(
    files: list[Path], parts: list[Path], types: dict[str, pl.DataType], directory: Path
) -> None:
    """Each log file's sidecar, row group by row group, from the buckets' results (each sorted
    by key): only the bucket row groups whose key range meets the log row group's are read."""
    columns = list(types)
    empty = pl.DataFrame(schema={"__key": pl.Int64, **types})
    handles = [pq.ParquetFile(p) for p in parts]
    ranges = [_key_ranges(h) for h in handles]
    for i, file in enumerate(files):
        metadata = pq.read_metadata(file)
        writer, start = None, i << KEY_SHIFT
        for g in range(metadata.num_row_groups):
            size = metadata.row_group(g).num_rows
            pieces = []
            for handle, (lows, highs) in zip(handles, ranges, strict=True):
                wanted = np.flatnonzero((highs >= start) & (lows < start + size))
                if len(wanted):
                    pieces.append(pl.from_arrow(handle.read_row_groups(wanted.tolist())))
            piece = (
                pl.concat([empty, *pieces], how="vertical_relaxed")
                .filter(pl.col("__key").is_between(start, start + size - 1))
                .sort("__key")
                .select(columns)
            )
            if piece.height != size:
                raise ConfigError(f"{file} changed while its histories were derived")
            table = piece.to_arrow()
            writer = writer or pq.ParquetWriter(directory / f"{i}.parquet", table.schema)
            writer.write_table(table, row_group_size=max(size, 1))
            start += size
        if writer is None:  # a file with no row group
            empty.select(columns).write_parquet(directory / f"{i}.parquet")
        else:
            writer.close()


def _key_ranges(handle: pq.ParquetFile) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) key of each row group of a sorted bucket result, from its statistics."""
    index = handle.schema_arrow.get_field_index("__key")
    meta = handle.metadata
    stats = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
    return np.array([s.min for s in stats]), np.array([s.max for s in stats])


# -- one bucket -------------------------------------------------------------------------------


# -- the rule: which events enter a user's history, in what order ------------------------------


def event_time(timestamp: str) -> pl.Expr:
    """An event's time as a float (datetimes by their physical value): what orders a history."""
    return pl.col(timestamp).to_physical().cast(pl.Float64)


def placed(user: pl.Expr, time: pl.Expr) -> pl.Expr:
    """Whether an event has a place in a user's timeline: a user, and a time neither null nor
    NaN (``time`` as ``event_time`` gives it)."""
    return user.is_not_null() & time.is_not_null() & ~time.is_nan()


def positive(label: str) -> pl.Expr:
    """Whether an event's ``from_label`` is 1 (null is not)."""
    return (pl.col(label).cast(pl.Float64) == 1).fill_null(False)


def latest_histories(
    log: pl.LazyFrame, user_key: str, specs: list[FeatureSpec], columns: list[str]
) -> list[pl.LazyFrame]:
    """Per user, each derived sequence (``specs``, their values from ``columns``) as it
    stands after the whole of ``log``: the values at the user's last ``max_len`` positives,
    most recent last, ties in time in log order (the same rule, and order, as ``derive``'s
    per-impression histories). What the service holds for a request made after the log."""
    out = []
    for spec, value in zip(specs, columns, strict=True):
        time = event_time(spec.timestamp)
        out.append(
            log.filter(positive(spec.from_label) & placed(pl.col(user_key), time))
            .select(user_key, time.alias("__t"), value)
            .sort("__t", maintain_order=True)
            .group_by(user_key, maintain_order=True)
            .agg(pl.col(value).tail(spec.max_len).alias(spec.column))
        )
    return out


def _positions(
    frame: pl.DataFrame, user_key: str, group: HistoryGroup, events: _EventWriter
) -> pl.DataFrame:
    """Each row's position in ``group``'s events (rows of whole users, in ``frame``'s
    order): a struct column per sequence; the bucket's positives are appended to
    ``events``."""
    rows = frame.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("__i"),
        pl.col(user_key).alias("__user"),
        event_time(group.timestamp).alias("__t"),
        positive(group.label).alias("__pos"),
        *(pl.col(v).alias(s.column) for s, v in zip(group.specs, group.values, strict=True)),
    )
    usable = placed(pl.col("__user"), pl.col("__t"))
    positives = rows.filter(pl.col("__pos") & usable).sort("__user", "__t", "__i")
    offset = events.write(positives.select(s.column for s in group.specs))
    positives = positives.with_row_index("__p", offset=offset)
    # The end (exclusive) of a user's positives at each of their distinct times, and where
    # the user's positives start.
    ends = (
        positives.group_by("__user", "__t")
        .agg((pl.col("__p").max() + 1).cast(pl.Int64).alias("end"))
        .sort("__t")
    )
    starts = positives.group_by("__user").agg(pl.col("__p").min().cast(pl.Int64).alias("__start"))
    found = (
        rows.filter(usable)
        .select("__i", "__user", "__t")
        .sort("__t")
        .join_asof(
            ends,
            on="__t",
            by="__user",
            strategy="backward",
            allow_exact_matches=False,
            check_sortedness=False,  # sorted by time above; polars cannot check within groups
        )
        .join(starts, on="__user", how="left")
        .select("__i", "end", (pl.col("end") - pl.col("__start")).alias("n"))
    )
    position = (
        rows.select("__i")
        .join(found, on="__i", how="left", maintain_order="left")
        .select(pl.struct(pl.col("end").fill_null(0), pl.col("n").fill_null(0)).alias("p"))
        .to_series()
    )
    return pl.DataFrame([position.alias(s.column) for s in group.specs])


# -- reading: histories as slices of the events ------------------------------------------------


@dataclass(frozen=True)
class EventSlices:
    """Histories as slices of one event array: row r's is ``events[end[r] - count[r] :
    end[r]]``, most recent last. A batch holds these until it is cut (slicing and
    concatenating rows touch two ints per row, never L ids); ``ids`` then gives ``[B, L]``."""

    events: np.ndarray  # int64 [E], vocabulary indices
    end: np.ndarray  # int64 [B]
    count: np.ndarray  # int64 [B], at most max_len
    max_len: int

    def __len__(self) -> int:
        return len(self.end)

    def __getitem__(self, index: slice | np.ndarray) -> EventSlices:
        return EventSlices(self.events, self.end[index], self.count[index], self.max_len)

    @staticmethod
    def concat(parts: list[EventSlices]) -> EventSlices:
        first = parts[0]
        if any(p.events is not first.events or p.max_len != first.max_len for p in parts):
            raise ValueError("histories sliced from different events cannot be concatenated")
        end, count = (np.concatenate([getattr(p, k) for p in parts]) for k in ("end", "count"))
        return EventSlices(first.events, end, count, first.max_len)

    def ids(self) -> np.ndarray:
        """int64 ``[B, max_len]``: each row's history right-aligned, 0 = padding."""
        return right_aligned(
            self.events[_ranges(self.end - self.count, self.count)], self.count, self.max_len, 0
        )


class Events:
    """The derived histories of a log: each group's events and the sidecars of positions
    (``derive`` writes them). Loaded lazily, once per process (not pickled to loader
    workers: each reads the file)."""

    def __init__(self, directory: Path, groups: list[HistoryGroup], sidecars: list[Path]) -> None:
        self.directory, self.sidecars = directory, sidecars
        self.group = {s.column: i for i, g in enumerate(groups) for s in g.specs}
        self._values: dict[str, pl.Series] = {}
        self._ids: dict[str, tuple[object, np.ndarray]] = {}  # column -> (vocabulary, ids)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_values": {}, "_ids": {}}

    def values(self, column: str) -> pl.Series:
        """Every event's value of a derived sequence, in event order."""
        if column not in self._values:
            path = self.directory / f"events-{self.group[column]}.parquet"
            self._values[column] = pl.read_parquet(path, columns=[column]).to_series()
        return self._values[column]

    def ids(
        self, column: str, vocabulary: object, lookup: Callable[[pl.Series], np.ndarray]
    ) -> np.ndarray:
        """The events' values as vocabulary indices (``lookup``), computed once per
        vocabulary (a warm start or a loaded state brings another)."""
        cached = self._ids.get(column)
        if cached is None or cached[0] is not vocabulary:
            cached = self._ids[column] = (vocabulary, lookup(self.values(column)))
        return cached[1]

    def lists(self, positions: pl.Series, column: str, max_len: int) -> pl.Series:
        """The histories at ``positions`` (a sidecar column) as a list column of values."""
        end, n = _bounds(positions)
        count = np.minimum(n, max_len)
        return _gather_lists(self.values(column), end - count, count)


def _bounds(positions: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(end, n) of each row, from a sidecar column."""
    end, n = (positions.struct.field(k).fill_null(0) for k in ("end", "n"))
    return end.to_numpy().astype(np.int64), n.to_numpy().astype(np.int64)


def event_slices(
    positions: pl.Series, events: np.ndarray, max_len: int
) -> tuple[EventSlices, np.ndarray]:
    """(the histories at ``positions``, each row's length before truncation)."""
    end, n = _bounds(positions)
    return EventSlices(events, end, np.minimum(n, max_len), max_len), n


def _ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concat(arange(f, f + c))`` over the rows: one vectorised expression."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(first - offsets, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def _gather_lists(values: pl.Series, first: np.ndarray, counts: np.ndarray) -> pl.Series:
    """Row r's list is ``values[first[r] : first[r] + counts[r]]``: one gather, no loop."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = values.gather(_ranges(first, counts)).to_arrow()
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks()
    return pl.Series(pa.LargeListArray.from_arrays(pa.array(offsets), flat))
