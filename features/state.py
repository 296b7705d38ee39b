"""FeatureState: vocabularies and numeric statistics fitted on the training split.

Fitting reads the training split lazily with polars' streaming engine, all features in one
``collect_all``. Each categorical feature gets a vocabulary (index 0 = unknown or missing;
values seen fewer than ``min_count`` times fold into it; at most ``max_size`` most frequent
values are kept), each numeric feature its statistics (mean / std after the transform, or
quantile boundaries for ``quantile_bucket``).

A sequence feature shares the vocabulary of its ``vocabulary_of`` feature: nothing is fitted.

``transform`` maps raw rows to the arrays every model consumes, vectorised in polars / numpy:
``cat`` int64 [B, F_cat] (per-feature local indices), ``num`` float32 [B, F_num], per
sequence ``ids`` int64 [B, L] (the most recent L values right-aligned, vocabulary indices,
0 = padding or unknown) and ``lengths`` int64 [B] (before truncation), ``labels`` float32
[B, T] (NaN where not observed) and ``users`` int64 [B] for grouped metrics. One
implementation serves training, evaluation and export.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.config import ATTENDED, ConfigError, DatasetConfig, FeatureSpec, TaskSpec
from features.contract import (
    HASH_INCREMENT,
    HASH_MULTIPLIER,
    HASH_PRIME,
    flatten_recent,
    right_aligned,
)
from features.history import Events, EventSlices, event_slices

STATE_FILE = "feature_state.json"
INLINE_VOCAB_LIMIT = 50_000  # larger vocabularies go to a Parquet file beside the JSON
QUANTILE_SAMPLE = 1_000_000  # rows quantile boundaries are computed from, at most (about)
LARGE_VOCABULARY = 1_000  # more ids than this (the unknown index aside): a large vocabulary


@dataclass(frozen=True)
class SequenceInput:
    """A sequence input of a model: ids ``[B, max_len]`` in the vocabulary (and embedding
    rows) of the categorical input ``vocabulary``, pooled by ``pooling`` (target attention
    queries with the embedding of the categorical input ``target``)."""

    name: str
    vocabulary: str
    max_len: int
    pooling: str = "mean"
    target: str | None = None
    search_k: int = 0  # pooling: search: behaviours kept
    search_by: str | None = None  # pooling: search: the aligned sequence of hard search


@dataclass(frozen=True)
class InputSpec:
    """What a model needs to know of its inputs: the layout of ``cat``, ``num`` and the
    sequences."""

    cat_names: tuple[str, ...]
    cardinalities: tuple[int, ...]  # rows per categorical feature, unknown index included
    embedding_dims: tuple[int, ...]
    num_names: tuple[str, ...]
    sequences: tuple[SequenceInput, ...] = ()
    cat_sides: tuple[str, ...] = ()  # per categorical feature: user | item | context
    arms: tuple[str, ...] = ()  # uplift data: the treatment arms, control first; () otherwise
    # Per embedded input: for the catalogue's features, the share of validation rows whose id
    # has no row of its own (index 0: unseen in training, rarer than min_count, or missing);
    # None where not measured (outside the catalogue; hashed: a new id shares a bucket's row);
    # () where nothing was measured.
    cat_unseen: tuple[float | None, ...] = ()

    @property
    def num_numeric(self) -> int:
        return len(self.num_names)

    @property
    def large_vocabularies(self) -> tuple[bool, ...]:
        """Per categorical feature: has it more than ``LARGE_VOCABULARY`` ids?"""
        return tuple(rows - 1 > LARGE_VOCABULARY for rows in self.cardinalities)

    @property
    def catalogue(self) -> tuple[str, ...]:
        """The item-side categorical features with a large vocabulary: the catalogue."""
        return tuple(
            name
            for name, side, large in zip(
                self.cat_names, self.cat_sides, self.large_vocabularies, strict=False
            )
            if side == "item" and large
        )


@dataclass
class Batch:
    """Transformed rows as numpy arrays (the DataModule turns them into a ``TensorBatch``)."""

    cat: np.ndarray  # int64 [B, F_cat]
    num: np.ndarray  # float32 [B, F_num]
    labels: np.ndarray  # float32 [B, T], NaN = not observed
    users: np.ndarray  # int64 [B]
    # name -> int64 [B, L], or slices of the log's events until the batch is cut
    sequences: dict[str, np.ndarray | EventSlices] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int64 [B]
    treatment: np.ndarray | None = None  # int64 [B]: the arm received, 0 = control (uplift data)
    propensity: np.ndarray | None = None  # float32 [B]: its probability (1 where not logged)

    def __len__(self) -> int:
        return len(self.users)

    def map(self, fn: Any) -> Batch:
        """The same batch with ``fn`` applied to every array (a slice, a concatenation)."""
        return map_fields(self, fn)


def map_fields(batch: Any, fn: Any) -> Any:
    """A batch of the same type (``Batch``, ``TensorBatch``: the same named fields) with
    ``fn`` applied to every array of it."""
    return type(batch)(
        fn(batch.cat),
        fn(batch.num),
        fn(batch.labels),
        fn(batch.users),
        {k: fn(v) for k, v in batch.sequences.items()},
        {k: fn(v) for k, v in batch.lengths.items()},
        *(None if a is None else fn(a) for a in (batch.treatment, batch.propensity)),
    )


@dataclass
class CategoricalState:
    name: str
    column: str
    dtype: str  # "int" or "str": how raw values are normalised before lookup
    values: list[Any]  # value i has index i + 1
    hash_buckets: int = 0  # > 0: ids hashed into 1..hash_buckets, no vocabulary (``values`` empty)
    # Per value, the generation (training window of a warm-started line) it was last seen in;
    # empty: all in generation 0. Eviction under ``max_size`` drops the oldest first.
    last_seen: list[int] = field(default_factory=list)

    @property
    def cardinality(self) -> int:
        return (self.hash_buckets or len(self.values)) + 1

    @cached_property
    def lookup(self) -> tuple[pl.Series, pl.Series]:
        """(vocabulary, its indices) as Series, built once: transform runs per batch."""
        vocab = pl.Series(self.values, dtype=pl.Int64 if self.dtype == "int" else pl.String)
        return vocab, pl.Series(np.arange(1, len(vocab) + 1, dtype=np.int64))


@dataclass
class SequenceState:
    """A sequence feature: its column (a list column, as logged or derived) and the
    categorical feature whose vocabulary it shares."""

    name: str
    column: str
    vocabulary: str
    max_len: int
    pooling: str = "mean"
    target: str | None = None
    search_k: int = 0  # pooling: search only
    search_by: str | None = None  # pooling: search only: the aligned sequence of hard search


@dataclass
class TreatmentState:
    """The arms of uplift data as fitted on the training split: ``arms[0]`` the control value,
    the others in sorted order (as strings; an arm unseen in training maps to -1)."""

    column: str
    arms: list[str]
    propensity: str | None = None

    def index_expr(self) -> pl.Expr:
        arm = pl.col(self.column).cast(pl.String)
        mapping = dict(zip(self.arms, range(len(self.arms)), strict=True))
        return arm.replace_strict(mapping, default=-1, return_dtype=pl.Int64).alias("treatment:")

    def propensity_expr(self) -> pl.Expr:
        value = pl.col(self.propensity) if self.propensity else pl.lit(1.0)
        return value.cast(pl.Float32).fill_null(1.0).alias("propensity:")


@dataclass
class NumericState:
    name: str
    column: str
    transform: str
    mean: float = 0.0
    std: float = 1.0
    boundaries: list[float] = field(default_factory=list)  # quantile_bucket only

    @property
    def cardinality(self) -> int:
        return len(self.boundaries) + 2  # 0 = missing, then one per interval


def _hashed_state(spec: FeatureSpec, dtype: str, logged: pl.DataType) -> CategoricalState:
    if dtype != "int":
        raise ConfigError(
            f"feature '{spec.name}': hash_buckets needs integer ids, but column '{spec.column}' "
            f"holds {logged}: the exported graph has no string hash to match (use a fitted "
            "vocabulary for it)"
        )
    return CategoricalState(spec.name, spec.column, "int", [], spec.hash_buckets)


def categorical_expr(column: str, dtype: pl.DataType) -> tuple[pl.Expr, str]:
    """Normalise a categorical column: integers (and booleans) stay ints, the rest strings."""
    if dtype.is_integer() or dtype == pl.Boolean:
        return pl.col(column).cast(pl.Int64), "int"
    return pl.col(column).cast(pl.String), "str"


def lookup_expr(state: CategoricalState, dtype: pl.DataType, column: str = "") -> pl.Expr:
    """Raw values (of ``column``, default the feature's) -> vocabulary indices; unknown,
    missing or unparsable values -> 0."""
    if state.dtype == "int":
        numeric = dtype.is_integer() or dtype == pl.Boolean
        value = pl.col(column or state.column).cast(pl.Int64, strict=numeric)
    else:
        value = pl.col(column or state.column).cast(pl.String)
    if state.hash_buckets:
        return hashed_index(value, state.hash_buckets)
    vocab, indices = state.lookup
    return value.replace_strict(vocab, indices, default=0, return_dtype=pl.Int64).fill_null(0)


def hashed_index(ids: pl.Expr, buckets: int) -> pl.Expr:
    """Integer ids -> 1 + their hash mod ``buckets`` (``features.contract``); null -> 0."""
    mixed = (ids % HASH_PRIME) * HASH_MULTIPLIER + HASH_INCREMENT
    return (mixed % HASH_PRIME % buckets + 1).fill_null(0)


def numeric_expr(column: str, transform: str) -> pl.Expr:
    x = pl.col(column).cast(pl.Float64)
    x = pl.when(x.is_finite()).then(x)  # inf / nan count as missing
    return x.clip(lower_bound=0).log1p() if transform == "log1p" else x


def grown(
    old: CategoricalState, counts: pl.DataFrame, spec: FeatureSpec, generation: int, grow: bool
) -> CategoricalState:
    """A warm start's vocabulary: ``old``'s, grown with a new window's ``counts`` (``value``,
    ``count``, most frequent first).

    Old ids keep their place (and so their embedding rows); ids new to the window with at
    least ``min_count`` rows are appended, most frequent first (none with ``grow=False``);
    every id seen in the window is stamped with this ``generation``. Past ``max_size``, the
    least recently seen ids are evicted: the oldest ``last_seen`` first, then the fewest rows
    in this window, then the latest added.
    """
    dtype = old.lookup[0].dtype
    n = len(old.values)
    before = pl.DataFrame(
        {
            "value": old.lookup[0],
            "last_seen": pl.Series(old.last_seen or [0] * n, dtype=pl.Int64),
            "order": pl.int_range(n, eager=True, dtype=pl.Int64),
        }
    )
    counts = counts.with_columns(pl.col("value").cast(dtype), pl.col("count").cast(pl.Int64))
    pool = before.join(counts, on="value", how="left", maintain_order="left").with_columns(
        last_seen=pl.when(pl.col("count").is_null())
        .then(pl.col("last_seen"))
        .otherwise(pl.lit(generation, dtype=pl.Int64)),
        count=pl.col("count").fill_null(0),
    )
    if grow:
        new = counts.filter(
            pl.col("count") >= spec.min_count, ~pl.col("value").is_in(old.lookup[0].implode())
        )
        new = new.with_columns(
            last_seen=pl.lit(generation, dtype=pl.Int64),
            order=pl.int_range(n, n + new.height, dtype=pl.Int64),
        )
        pool = pl.concat([pool, new.select(pool.columns)])
    if spec.max_size and pool.height > spec.max_size:
        ranked = pool.sort(["last_seen", "count", "order"], descending=[True, True, False])
        pool = pool.filter(pl.col("order").is_in(ranked["order"].head(spec.max_size).implode()))
    return CategoricalState(
        old.name, old.column, old.dtype, pool["value"].to_list(), 0, pool["last_seen"].to_list()
    )


def _kinds_of_state(state: FeatureState) -> dict[str, str]:
    kinds = {
        c.name: f"categorical hashed into {c.hash_buckets}" if c.hash_buckets else "categorical"
        for c in state.categorical
    }
    kinds |= {n.name: f"numeric ({n.transform})" for n in state.numeric}
    kinds |= {s.name: f"a sequence of {s.vocabulary} ({s.pooling})" for s in state.sequences}
    return kinds


def _kinds_of_config(config: DatasetConfig) -> dict[str, str]:
    kinds = {}
    for f in config.features:
        if f.kind == "categorical":
            kinds[f.name] = (
                f"categorical hashed into {f.hash_buckets}" if f.hash_buckets else "categorical"
            )
        elif f.kind == "numeric":
            kinds[f.name] = f"numeric ({f.transform})"
        else:
            kinds[f.name] = f"a sequence of {f.vocabulary_of} ({f.pooling})"
    return kinds


def check_parent(parent: FeatureState, config: DatasetConfig) -> None:
    """A warm start's dataset has the parent's tasks and features, each of the same kind; else
    one error naming every difference."""
    problems = []
    then, now = [t.name for t in parent.tasks], [t.name for t in config.tasks]
    if then != now:
        problems.append(f"tasks {now} here, {then} in the parent")
    before, here = _kinds_of_state(parent), _kinds_of_config(config)
    for name in sorted(set(before) | set(here)):
        if name not in before:
            problems.append(f"feature '{name}' is not in the parent")
        elif name not in here:
            problems.append(f"the parent's feature '{name}' is missing here")
        elif before[name] != here[name]:
            problems.append(f"feature '{name}' is {here[name]} here, {before[name]} in the parent")
    if problems:
        where = config.source or config.name
        raise ConfigError(
            f"warm start: {where} does not match the parent model's data: " + "; ".join(problems)
        )


def fit_arms(train: pl.LazyFrame, config: DatasetConfig) -> TreatmentState | None:
    """The arms of uplift data (control first, then sorted), read from the training split."""
    t = config.treatment
    if t is None:
        return None
    seen = train.select(pl.col(t.column).cast(pl.String).unique().drop_nulls()).collect()
    others = sorted(a for a in seen.to_series().to_list() if a != str(t.control))
    return TreatmentState(t.column, [str(t.control), *others], t.propensity)


class FeatureState:
    def __init__(
        self,
        categorical: list[CategoricalState],
        numeric: list[NumericState],
        tasks: list[TaskSpec],
        user_key: str,
        sequences: list[SequenceState] | None = None,
        generation: int = 0,
        treatment: TreatmentState | None = None,
    ) -> None:
        self.categorical = categorical
        self.numeric = numeric
        self.tasks = tasks
        self.user_key = user_key
        self.sequences = sequences or []
        self.generation = generation  # 0: fitted cold; k: the k-th warm start of a line
        self.treatment = treatment  # uplift data: the arms

    # -- layout -------------------------------------------------------------------------------

    @property
    def bucketized(self) -> list[NumericState]:
        return [n for n in self.numeric if n.transform == "quantile_bucket"]

    @property
    def dense(self) -> list[NumericState]:
        return [n for n in self.numeric if n.transform != "quantile_bucket"]

    def input_spec(self, features: tuple[FeatureSpec, ...]) -> InputSpec:
        dims = {f.name: f.embedding_dim for f in features}
        sides = {f.name: f.side for f in features}
        embedded = [*self.categorical, *self.bucketized]
        return InputSpec(
            cat_names=tuple(s.name for s in embedded),
            cardinalities=tuple(s.cardinality for s in embedded),
            embedding_dims=tuple(dims[s.name] for s in embedded),
            num_names=tuple(s.name for s in self.dense),
            sequences=tuple(
                SequenceInput(
                    s.name, s.vocabulary, s.max_len, s.pooling, s.target, s.search_k, s.search_by
                )
                for s in self.sequences
            ),
            cat_sides=tuple(sides[s.name] for s in embedded),
            arms=tuple(self.treatment.arms) if self.treatment else (),
        )

    def unseen_shares(
        self, frame: pl.LazyFrame, features: tuple[str, ...]
    ) -> tuple[float | None, ...]:
        """Per embedded input (``input_spec`` order): for the categorical ``features``, the
        share of ``frame``'s rows whose id maps to the unknown index 0 (only their columns are
        read); None for every other input and for a hashed feature (every id has a bucket)."""
        schema = frame.collect_schema()
        vocabularies = [s for s in self.categorical if s.name in features and not s.hash_buckets]
        unknown = [
            (lookup_expr(s, schema[s.column]) == 0).mean().alias(s.name) for s in vocabularies
        ]
        found = (
            frame.select(unknown).collect(engine="streaming").row(0, named=True) if unknown else {}
        )
        shares = [
            float(found[s.name] or 0.0) if s.name in found else None for s in self.categorical
        ]
        return (*shares, *(None for _ in self.bucketized))

    # -- fitting ------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        train: pl.LazyFrame,
        config: DatasetConfig,
        rows: int = 0,
        parent: FeatureState | None = None,
        grow: bool = True,
        refit_numeric: bool = False,
    ) -> FeatureState:
        """Fit on the (lazy) training split: one streaming ``collect_all`` for all features.

        Vocabularies, means and standard deviations are exact. Quantile boundaries need the
        values in memory, so with ``rows`` (the split's size) above ``QUANTILE_SAMPLE`` they
        come from every k-th row, about ``QUANTILE_SAMPLE`` of them: memory stays flat.

        With a ``parent`` (a warm start), each vocabulary grows from the parent's (``grown``;
        ``grow=False`` keeps it as it was) and the numeric statistics are the parent's unless
        ``refit_numeric``.
        """
        if parent is not None:
            check_parent(parent, config)
        every = max(1, -(-rows // QUANTILE_SAMPLE))
        schema = train.collect_schema()
        queries: list[pl.LazyFrame] = []
        plans: list[tuple[FeatureSpec, str]] = []
        hashed: dict[str, CategoricalState] = {}
        stats: list[pl.Expr] = []
        quantiles: list[pl.Expr] = []
        for spec in config.features:
            if spec.kind == "sequence":
                continue  # shares the vocabulary of a categorical feature
            if spec.kind == "categorical":
                expr, dtype = categorical_expr(spec.column, schema[spec.column])
                if spec.hash_buckets:
                    hashed[spec.name] = _hashed_state(spec, dtype, schema[spec.column])
                    continue  # no fit pass: the hash needs none
                counts = (
                    train.select(expr.alias("value"))
                    .drop_nulls()
                    .group_by("value")
                    .agg(pl.len().alias("count"))
                    # Most frequent first; ties by value so the vocabulary is deterministic.
                    .sort(["count", "value"], descending=[True, False])
                )
                if parent is None:  # a warm start needs every count (``grown``)
                    counts = counts.filter(pl.col("count") >= spec.min_count)
                    counts = counts.head(spec.max_size) if spec.max_size else counts
                queries.append(counts)
                plans.append((spec, dtype))
            elif parent is not None and not refit_numeric:
                continue  # the parent's statistics
            elif spec.transform == "quantile_bucket":
                qs = np.linspace(0, 1, spec.buckets + 1)[1:-1]
                x = numeric_expr(spec.column, spec.transform)
                quantiles += [
                    x.quantile(float(q)).alias(f"{spec.name}:q{i}") for i, q in enumerate(qs)
                ]
            else:
                x = numeric_expr(spec.column, spec.transform)
                stats += [x.mean().alias(f"{spec.name}:mean"), x.std().alias(f"{spec.name}:std")]
        # Every k-th row by a filter on the row index: it streams, where ``gather_every``
        # (or quantiles beside other aggregations) takes whole columns into memory.
        sample = train.with_row_index("__row").filter(pl.col("__row") % every == 0)
        queries += [train.select(stats)] if stats else []
        queries += [sample.select(quantiles)] if quantiles else []
        # Each query scans the log itself: shared, the scan would be cached whole in memory
        # (common sub-plan elimination), which grows with the log (1.9 GB at 10M rows).
        results = pl.collect_all(
            queries, engine="streaming", optimizations=pl.QueryOptFlags(comm_subplan_elim=False)
        )
        vocabularies = dict(zip([s.name for s, _ in plans], results[: len(plans)], strict=True))
        row: dict[str, object] = {}
        for summary in results[len(plans) :]:
            row |= summary.row(0, named=True)

        generation = parent.generation + 1 if parent is not None else 0
        before = {c.name: c for c in parent.categorical} if parent is not None else {}
        fitted = {
            spec.name: grown(before[spec.name], vocabularies[spec.name], spec, generation, grow)
            if parent is not None
            else CategoricalState(
                spec.name, spec.column, dtype, vocabularies[spec.name]["value"].to_list()
            )
            for spec, dtype in plans
        }
        if parent is not None:
            hashed = {name: before[name] for name in hashed}
        categorical = [
            hashed.get(spec.name) or fitted[spec.name]
            for spec in config.features
            if spec.kind == "categorical"
        ]
        numeric = []
        kept = {n.name: n for n in parent.numeric} if parent and not refit_numeric else {}
        for spec in config.features:
            if spec.kind != "numeric":
                continue
            if spec.name in kept:
                numeric.append(kept[spec.name])
            elif spec.transform == "quantile_bucket":
                qs = [row[k] for k in row if k.startswith(f"{spec.name}:q") and row[k] is not None]
                numeric.append(
                    NumericState(spec.name, spec.column, spec.transform, boundaries=sorted(set(qs)))
                )
            else:
                mean, std = row[f"{spec.name}:mean"], row[f"{spec.name}:std"]
                numeric.append(
                    NumericState(
                        spec.name,
                        spec.column,
                        spec.transform,
                        mean=float(mean) if mean is not None else 0.0,
                        std=float(std) if std and std > 0 else 1.0,
                    )
                )
        sequences = [
            SequenceState(
                spec.name,
                spec.column,
                spec.vocabulary_of,
                spec.max_len,
                spec.pooling,
                spec.target or spec.vocabulary_of if spec.pooling in ATTENDED else None,
                *((spec.search_k, spec.search_by) if spec.pooling == "search" else ()),
            )
            for spec in config.sequences
        ]
        treatment = fit_arms(train, config)
        return cls(
            categorical,
            numeric,
            list(config.tasks),
            config.user_key,
            sequences,
            generation,
            treatment,
        )

    def rows_from(self, parent: FeatureState) -> list[np.ndarray]:
        """Per embedded input (``input_spec`` order), the parent's index of each of this
        state's indices, -1 where the parent has none (a new id): what a warm start copies.
        Hashed features and quantile buckets map index to index."""
        before = {c.name: c for c in [*parent.categorical, *parent.bucketized]}
        maps = []
        for state in [*self.categorical, *self.bucketized]:
            old = before[state.name]
            if not isinstance(state, CategoricalState) or state.hash_buckets:
                index = np.arange(state.cardinality, dtype=np.int64)
                maps.append(np.where(index < old.cardinality, index, -1))
                continue
            position = pl.DataFrame(
                {"value": old.values, "old": np.arange(1, len(old.values) + 1)},
                schema={"value": state.lookup[0].dtype, "old": pl.Int64},
            )
            new = pl.DataFrame({"value": state.lookup[0]})
            found = new.join(position, on="value", how="left", maintain_order="left")
            maps.append(np.concatenate([[0], found["old"].fill_null(-1).to_numpy()]))
        return maps

    # -- transform ----------------------------------------------------------------------------

    def transform(self, frame: pl.DataFrame, events: Events | None = None) -> Batch:
        """Raw rows (side tables joined) -> arrays. Unknown values map to index 0. A derived
        history read as positions (``LogSource.read_piece(positions=True)``) stays a slice of
        ``events`` (``EventSlices``) until the batch is cut."""
        cat_exprs = [lookup_expr(s, frame.schema[s.column]).alias(s.name) for s in self.categorical]
        raw_bucketized = [
            numeric_expr(n.column, n.transform).alias(n.name) for n in self.bucketized
        ]
        dense = [
            ((numeric_expr(n.column, n.transform) - n.mean) / n.std).fill_null(0.0).alias(n.name)
            for n in self.dense
        ]
        out = frame.select([*cat_exprs, *raw_bucketized, *dense, *self._target_exprs(frame)])

        n = out.height
        cat = np.empty((n, len(self.categorical) + len(self.bucketized)), dtype=np.int64)
        if self.categorical:
            cat[:, : len(self.categorical)] = out.select(
                [s.name for s in self.categorical]
            ).to_numpy()
        for j, s in enumerate(self.bucketized, start=len(self.categorical)):
            x = out[s.name].to_numpy(allow_copy=True).astype(np.float64)
            idx = np.searchsorted(np.asarray(s.boundaries), x, side="right") + 1
            cat[:, j] = np.where(np.isnan(x), 0, idx)
        num = (
            out.select([s.name for s in self.dense]).to_numpy().astype(np.float32, copy=False)
            if self.dense
            else np.zeros((n, 0), dtype=np.float32)
        )
        labels, users = self._target_arrays(out)
        sequences, lengths = {}, {}
        for seq in self.sequences:
            column = frame[seq.column]
            if isinstance(column.dtype, pl.Struct):  # positions in the log's events
                if events is None:
                    raise ValueError(f"'{seq.column}' holds positions, but no events were given")
                ids = events.ids(seq.column, self._vocabulary(seq), partial(self._ids, seq))
                sequences[seq.name], lengths[seq.name] = event_slices(column, ids, seq.max_len)
            else:
                sequences[seq.name], lengths[seq.name] = self.sequence_ids(column, seq)
        return Batch(
            np.ascontiguousarray(cat),
            np.ascontiguousarray(num),
            labels,
            users,
            sequences,
            lengths,
            *self.arms_of(frame),
        )

    def arms_of(self, frame: pl.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Uplift data: each row's arm index (``treatment`` [B], -1 for an arm training never
        saw) and propensity [B]; (None, None) for other data and rows without the column (a
        request to score, which is scored for every arm)."""
        t = self.treatment
        if t is None or t.column not in frame.columns:
            return None, None
        out = frame.select(t.index_expr(), t.propensity_expr())
        return out["treatment:"].to_numpy().copy(), out["propensity:"].to_numpy().copy()

    def sequence_ids(self, lists: pl.Series, seq: SequenceState) -> tuple[np.ndarray, np.ndarray]:
        """A list column -> (vocabulary indices ``[B, max_len]``, most recent last, 0 = padding
        or unknown; each row's length before truncation)."""
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        values, counts = flatten_recent(lists, seq.max_len)
        return right_aligned(self._ids(seq, values), counts, seq.max_len, 0), lengths

    def _vocabulary(self, seq: SequenceState) -> CategoricalState:
        return next(c for c in self.categorical if c.name == seq.vocabulary)

    def _ids(self, seq: SequenceState, values: pl.Series) -> np.ndarray:
        """Values of a sequence as indices in its vocabulary (0 = unknown)."""
        ids = values.to_frame("v").select(lookup_expr(self._vocabulary(seq), values.dtype, "v"))
        return ids.to_series().to_numpy()

    def targets(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The labels and GAUC users of raw rows, as ``transform`` gives them, reading only the
        label and user columns."""
        return self._target_arrays(frame.select(self._target_exprs(frame)))

    def _target_exprs(self, frame: pl.DataFrame) -> list[pl.Expr]:
        # A label the rows do not carry (scoring an unlabelled log) is not observed: NaN.
        labels = [
            (pl.col(t.label) if t.label in frame.columns else pl.lit(None))
            .cast(pl.Float32)
            .fill_null(float("nan"))
            .alias(f"label:{t.name}")
            for t in self.tasks
        ]
        user = pl.col(self.user_key)
        user = (
            user.cast(pl.Int64)
            if frame.schema[self.user_key].is_integer()
            else user.hash(seed=0).reinterpret(signed=True)
        )
        # A missing user key (anonymous traffic) becomes user -1: one group for GAUC.
        return [*labels, user.fill_null(-1).alias("user:")]

    def _target_arrays(self, out: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        labels = out.select([f"label:{t.name}" for t in self.tasks]).to_numpy()
        return (
            np.ascontiguousarray(labels, dtype=np.float32),
            np.array(out["user:"].to_numpy(), dtype=np.int64),  # writable for torch
        )

    # -- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, strings and numbers: JSON-able, and loadable from a weights-only
        checkpoint (where the DataModule stores it beside the model)."""
        return {
            "version": 1,
            "generation": self.generation,
            "user_key": self.user_key,
            "categorical": [asdict(s) for s in self.categorical],
            "numeric": [asdict(n) for n in self.numeric],
            "tasks": [asdict(t) for t in self.tasks],
            "sequences": [asdict(s) for s in self.sequences],
            "treatment": asdict(self.treatment) if self.treatment else None,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FeatureState:
        return cls(
            [CategoricalState(**c) for c in doc["categorical"]],
            [NumericState(**n) for n in doc["numeric"]],
            [TaskSpec(**t) for t in doc["tasks"]],
            doc["user_key"],
            [SequenceState(**s) for s in doc.get("sequences", [])],
            doc.get("generation", 0),
            TreatmentState(**doc["treatment"]) if doc.get("treatment") else None,
        )

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        doc = self.to_dict()
        for entry in doc["categorical"]:
            if len(entry["values"]) > INLINE_VOCAB_LIMIT:
                file = f"vocab_{entry['name']}.parquet"
                columns = {"value": entry["values"]}
                if entry["last_seen"]:
                    columns["last_seen"], entry["last_seen"] = entry["last_seen"], file
                pl.DataFrame(columns).write_parquet(directory / file)
                entry["values"] = file
        path = directory / STATE_FILE
        path.write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> FeatureState:
        directory = Path(directory)
        path = directory / STATE_FILE if directory.is_dir() else directory
        doc = json.loads(path.read_text())
        for entry in doc["categorical"]:
            if isinstance(entry["values"], str):
                entry["values"] = pl.read_parquet(path.parent / entry["values"])["value"].to_list()
            if isinstance(entry.get("last_seen"), str):
                file = path.parent / entry["last_seen"]
                entry["last_seen"] = pl.read_parquet(file)["last_seen"].to_list()
        return cls.from_dict(doc)
