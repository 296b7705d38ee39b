"""Reading a behaviour log: Parquet files, directories and hive-partitioned datasets.

``LogSource`` binds a ``DatasetConfig`` to the files on disk. It checks, before any training,
that every file is Parquet, every column the config needs exists (naming the column and the
file), labels are 0/1/null and no split is empty. It then offers the split as a polars
``LazyFrame`` (for fitting, streamed) and as a list of row-group pieces (for the DataModule,
which reads them one at a time). Both paths join the side tables and filter the split with
the same polars expressions, so fitting and training see the same rows.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from features.config import SPLITS, ConfigError, DatasetConfig, FeatureSpec, SplitName
from features.history import Events, check_columns, derive, history_groups

PARQUET_MAGIC = b"PAR1"
SPLIT_COLUMN = "__split"  # pre-split data: the split of each row's file


def parquet_files(path: Path, skipped: dict[str, str] | None = None) -> list[Path]:
    """The Parquet files behind a path, each checked to really be Parquet. With ``skipped``
    (a dict), unreadable files are recorded there (file -> why) instead of raising."""
    if not path.exists():
        raise ConfigError(f"behaviour log {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise ConfigError(f"no Parquet files (*.parquet) under {path}")
    good = []
    for file in files:
        try:
            _check_file(file)
            good.append(file)
        except ConfigError as err:
            if skipped is None:
                raise
            skipped[str(file)] = str(err)
    if not good:
        raise ConfigError(f"every Parquet file under {path} is unreadable, e.g. {files[0]}")
    return good


def _check_file(file: Path) -> None:
    """Parquet magic at both ends and a footer that parses (a truncated file fails here)."""
    with file.open("rb") as handle:
        head = handle.read(4)
        size = handle.seek(0, 2)
        handle.seek(max(size - 4, 0))
        tail = handle.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise ConfigError(f"{file} is not a Parquet file (no PAR1 header/footer)")
    try:
        pq.read_metadata(file)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{file} is a corrupt or truncated Parquet file: {err}") from None


@dataclass(frozen=True)
class Piece:
    """One row group of one file: the unit the DataModule reads, shuffles and shards."""

    fragment: pads.ParquetFileFragment
    rows: int

    @property
    def path(self) -> str:
        return self.fragment.path


class LogSource:
    """A dataset config bound to its files: schema, side tables, split filters.

    ``skip_corrupt``: leave out log files that cannot be read (bad footer, or any page of a
    needed column that fails to decode: every file is read once up front to find them) and
    list them in ``skipped``, instead of stopping at the first.

    Derived histories (``features.history``) are computed once, up front: each user's events
    once, and each impression's position in them in sidecar files (cached under
    ``history_cache``). Reading the log reads the positions beside it and gives the histories
    as list columns (``max_len`` each), or, for the DataModule, as the positions themselves
    (``positions=True``), sliced when a batch is cut.
    """

    def __init__(
        self, config: DatasetConfig, skip_corrupt: bool = False, history_cache: Path | None = None
    ) -> None:
        self.config = config
        self.skipped: dict[str, str] = {}
        groups = history_groups(config)
        self.derived = {s.column: s for g in groups for s in g.specs}  # what the pre-pass writes
        skipped = self.skipped if skip_corrupt else None
        self.split_of: dict[str, SplitName] = {}  # pre-split data: file -> its split
        if config.split.mode == "paths":
            for split, path in config.split.paths.items():
                for file in parquet_files(path, skipped):
                    self.split_of.setdefault(str(file), split)
            self.files = [Path(f) for f in self.split_of]
            self.location = Path(os.path.commonpath([str(p) for p in config.split.paths.values()]))
        else:
            self.files = parquet_files(config.path, skipped)
            self.location = config.path
        self.hive = config.path is not None and config.path.is_dir()
        self.root = self.location if self.location.is_dir() else self.location.parent
        self.schema = self._log_schema()
        self.side_tables = self._load_side_tables()
        self._check_columns()
        if skip_corrupt:
            self._skip_unreadable_pages()
        # Derived histories: one pre-pass (cached) writes the events and a sidecar per file.
        self.sidecars: dict[str, Path] = {}
        self.events: Events | None = None
        if groups:
            for group in groups:
                check_columns(group, self.schema, self.where)
            try:
                self.events = derive(
                    self.files, config.user_key, groups, self.schema, history_cache
                )
            except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as err:
                raise self.unreadable(self.columns_needed(), err) from None
            written = self.events.sidecars
            self.sidecars = {str(f): p for f, p in zip(self.files, written, strict=True)}

    # -- schema -------------------------------------------------------------------------------

    def _scan(self, derived: bool = False) -> pl.LazyFrame:
        if self.split_of:
            log = pl.scan_parquet(
                self.files, hive_partitioning=False, include_file_paths=SPLIT_COLUMN
            ).with_columns(pl.col(SPLIT_COLUMN).replace_strict(self.split_of))
        else:
            log = pl.scan_parquet(self.files, hive_partitioning=self.hive)
        if not (derived and self.sidecars):
            return log
        sidecars = pl.scan_parquet([self.sidecars[str(f)] for f in self.files])
        return pl.concat([log, sidecars], how="horizontal").with_columns(
            pl.col(c).map_batches(
                lambda p, c=c: self._lists(p, c),
                return_dtype=pl.List(self.schema[self._value_column(c)]),
                is_elementwise=True,
            )
            for c in self.derived
        )

    def _value_column(self, column: str) -> str:
        return self.config.feature(self.derived[column].vocabulary_of).column

    def _lists(self, positions: pl.Series, column: str) -> pl.Series:
        """A derived sequence as a list column (its ``max_len`` last events) from positions."""
        assert self.events is not None
        lists = self.events.lists(positions, column, self.derived[column].max_len)
        return lists.cast(pl.List(self.schema[self._value_column(column)])).alias(column)

    def _log_schema(self) -> pl.Schema:
        try:
            return self._scan().collect_schema()
        except (pl.exceptions.PolarsError, OSError) as err:
            raise ConfigError(f"cannot read the schema of {self.location}: {err}") from err

    @property
    def where(self) -> str:
        """How errors name the log: the path, plus the first file for a directory."""
        if self.location.is_file():
            return str(self.location)
        return f"{self.location} (e.g. {self.files[0]})"

    def _load_side_tables(self) -> dict[str, pl.DataFrame]:
        """Side tables, read once into memory, one row per key, only the columns needed."""
        needed = {spec.column for spec in self.config.features}
        tables: dict[str, pl.DataFrame] = {}
        for table in self.config.side_tables:
            key = self.config.user_key if table.key == "user" else self.config.item_key
            file = parquet_files(table.path)
            schema = pl.scan_parquet(file).collect_schema()
            if key not in schema:
                raise ConfigError(f"column '{key}' ({table.key} key) is missing from {table.path}")
            if table.columns is not None:
                missing = [c for c in table.columns if c not in schema]
                if missing:
                    raise ConfigError(f"column '{missing[0]}' is missing from {table.path}")
                columns = list(table.columns)
            else:
                columns = [c for c in schema if c in needed and c not in self.schema and c != key]
            if key not in self.schema:
                raise ConfigError(f"column '{key}' ({table.key} key) is missing from {self.where}")
            frame = (
                pl.scan_parquet(file)
                .select([pl.col(key).cast(self.schema[key]), *columns])
                .unique(subset=key, keep="first", maintain_order=True)
                .collect()
            )
            tables[str(table.path)] = frame
        return tables

    @cached_property
    def joined_schema(self) -> pl.Schema:
        schema = dict(self.schema)
        for frame in self.side_tables.values():
            schema.update({c: t for c, t in frame.schema.items() if c not in schema})
        return pl.Schema(schema)

    def _check_columns(self) -> None:
        c = self.config
        required = [
            (c.user_key, "user key"),
            (c.item_key, "item key"),
            *([(c.time_column, "time column")] if c.time_column else []),
            *([(c.split.column, "split column")] if c.split.column else []),
            *((t.label, f"label of task '{t.name}'") for t in c.tasks),
            *((t.truth, f"true probability of task '{t.name}'") for t in c.tasks if t.truth),
            *((s.column, f"feature '{s.name}'") for s in c.features if s.column in self.schema),
            *self._treatment_columns(),
        ]
        for column, role in required:
            if column not in self.schema:
                raise ConfigError(f"column '{column}' ({role}) is missing from {self.where}")
        # The schema above is the first file's; name the exact file that lacks a column.
        partition_keys = set(self.schema) - set(pq.read_schema(self.files[0]).names)
        partition_keys.discard(SPLIT_COLUMN)
        for file in self.files[1:]:
            names = set(pq.read_schema(file).names) | partition_keys
            for column, role in required:
                if column not in names:
                    raise ConfigError(f"column '{column}' ({role}) is missing from {file}")
        for spec in c.features:
            if spec.derived:
                continue  # written by the history pre-pass
            if spec.column not in self.joined_schema:
                tables = ", ".join(str(t.path) for t in c.side_tables)
                also = f" or the side tables ({tables})" if tables else ""
                raise ConfigError(
                    f"column '{spec.column}' (feature '{spec.name}') is missing from "
                    f"{self.where}{also}"
                )
        for spec in c.sequences:
            if not spec.derived:
                self._check_list_column(spec)
        for task in c.tasks:
            dtype = self.schema[task.label]
            if not (dtype.is_numeric() or dtype == pl.Boolean):
                raise ConfigError(
                    f"label column '{task.label}' in {self.where} is {dtype}, "
                    "expected 0/1 integers or booleans"
                )

    def _treatment_columns(self) -> list[tuple[str, str]]:
        t = self.config.treatment
        if t is None:
            return []
        return [
            (t.column, "treatment.column"),
            *([(t.propensity, "treatment.propensity")] if t.propensity else []),
        ]

    def _check_list_column(self, spec: FeatureSpec) -> None:
        """A logged sequence is a list column whose elements have its vocabulary's type."""
        dtype = self.joined_schema[spec.column]
        where = self.where if spec.column in self.schema else "its side table"
        if not isinstance(dtype, pl.List):
            raise ConfigError(
                f"column '{spec.column}' (sequence '{spec.name}') in {where} is {dtype}, "
                "expected a list column"
            )
        vocabulary = self.config.feature(spec.vocabulary_of).column
        expected = self.joined_schema[vocabulary]
        element = dtype.inner
        integer = expected.is_integer() or expected == pl.Boolean
        if integer != (element.is_integer() or element == pl.Boolean):
            raise ConfigError(
                f"column '{spec.column}' (sequence '{spec.name}') in {where} holds {element}, but "
                f"its vocabulary_of '{spec.vocabulary_of}' ('{vocabulary}') is {expected}"
            )

    # -- splits -------------------------------------------------------------------------------

    @property
    def split_columns(self) -> tuple[str, ...]:
        """The columns ``split_filter`` reads."""
        mode = self.config.split.mode
        if mode == "paths":
            return (SPLIT_COLUMN,)
        return (self.config.split.column,) if mode == "column" else (self.config.time_column,)

    def split_filter(self, split: SplitName) -> pl.Expr:
        """Rows of a split: the file's split (pre-split data), the split column's value, or
        the time column compared with boundaries cast to its dtype."""
        if self.config.split.mode == "paths":
            return pl.col(SPLIT_COLUMN) == split
        if self.config.split.mode == "column":
            return pl.col(self.config.split.column).cast(pl.String) == split
        s, time = self.config.split, pl.col(self.config.time_column)
        dtype = self.schema[self.config.time_column]

        def at(value: str | int) -> pl.Expr:
            return pl.lit(_boundary(value, dtype), dtype=dtype)

        if split == "train":
            expr = time <= at(s.train_end)
            if s.train_start is not None:
                expr = expr & (time >= at(s.train_start))
            return expr
        if split == "val":
            return (time > at(s.train_end)) & (time <= at(s.val_end))
        expr = time > at(s.val_end)
        if s.test_end is not None:
            expr = expr & (time <= at(s.test_end))
        return expr

    def join_side_tables(self, frame: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame | pl.DataFrame:
        lazy = isinstance(frame, pl.LazyFrame)
        for table in self.config.side_tables:
            key = self.config.user_key if table.key == "user" else self.config.item_key
            side = self.side_tables[str(table.path)]
            frame = frame.join(
                side.lazy() if lazy else side, on=key, how="left", maintain_order="left"
            )
        return frame

    def columns_needed(self, extra: tuple[str, ...] = (), sequences: bool = True) -> list[str]:
        """Columns (before joins, derived histories included) that a transform of the split
        reads; without ``sequences``, what fitting reads."""
        c = self.config
        names = [c.user_key, c.item_key, *self.split_columns, c.time_column]
        names += [s.column for s in c.features if sequences or s.kind != "sequence"]
        names += [t.label for t in c.tasks] + [column for column, _ in self._treatment_columns()]
        names += list(extra)
        seen = dict.fromkeys(n for n in names if n in self.schema or n in self.derived)
        return list(seen)

    def scan(
        self, split: SplitName, extra: tuple[str, ...] = (), sequences: bool = True
    ) -> pl.LazyFrame:
        """The split as a lazy frame (streamable), side tables joined."""
        columns = self.columns_needed(extra, sequences)
        frame = self._scan(any(c in self.derived for c in columns)).select(columns)
        return self.join_side_tables(frame.filter(self.split_filter(split)))

    # -- one validation pass ------------------------------------------------------------------

    def validate(self) -> pl.DataFrame:
        """One streaming pass: where every row goes. Raises on labels outside {0, 1, null} and
        on an empty split. Returns the accounting: one row per ``split`` (``train`` / ``val``
        / ``test``, or ``none`` with the ``reason``), its ``rows`` and each label's observed
        (non-null) count."""
        c = self.config
        assigned = (
            pl.when(self.split_filter("train"))
            .then(pl.lit("train"))
            .when(self.split_filter("val"))
            .then(pl.lit("val"))
            .when(self.split_filter("test"))
            .then(pl.lit("test"))
            .otherwise(pl.lit("none"))
        )
        reason = pl.when(assigned == "none").then(self._unassigned_reason()).otherwise(pl.lit(""))
        labels = list(dict.fromkeys(t.label for t in c.tasks))
        invalid = [
            (pl.col(label).is_not_null() & ~pl.col(label).cast(pl.Float64).is_in([0.0, 1.0]))
            .sum()
            .alias(f"invalid:{label}")
            for label in labels
        ]
        observed = [pl.col(label).is_not_null().sum().alias(label) for label in labels]
        try:
            stats = (
                self._scan()
                .select([*self.split_columns, *labels])
                .group_by(assigned.alias("split"), reason.alias("reason"))
                .agg(pl.len().alias("rows"), *observed, *invalid)
                .collect(engine="streaming")
            )
        except (pl.exceptions.PolarsError, OSError) as err:
            raise self.unreadable([*self.split_columns, *labels], err) from None
        for label in labels:
            bad = int(stats[f"invalid:{label}"].sum())
            if bad:
                raise ConfigError(
                    f"label column '{label}' in {self.where} has {bad} value(s) outside "
                    "{0, 1, null}"
                )
        order = {name: i for i, name in enumerate([*SPLITS, "none"])}
        stats = stats.drop(f"invalid:{label}" for label in labels).sort(
            pl.col("split").replace_strict(order, return_dtype=pl.Int32), "reason"
        )
        for split in SPLITS:
            if not stats.filter(pl.col("split") == split)["rows"].sum():
                raise ConfigError(f"the {split} split of {self.where} is empty ({self._rule()})")
        if c.treatment is not None:
            self._check_arms(assigned)
        return stats

    def _check_arms(self, assigned: pl.Expr) -> None:
        """Uplift data: every row names its arm, control has rows, every arm has rows in
        every split, and a propensity is in (0, 1]."""
        t = self.config.treatment
        arm = pl.col(t.column)
        p = pl.col(t.propensity or t.column)  # read only where a propensity is named
        bad = p.is_null() | ~p.is_between(0, 1, closed="right")
        columns = [*self.split_columns, t.column, *([t.propensity] if t.propensity else [])]
        counts = (
            self._scan()
            .select(columns)
            .group_by(assigned.alias("split"), arm.cast(pl.String).alias("arm"))
            .agg(pl.len().alias("rows"), *([bad.sum().alias("bad")] if t.propensity else []))
            .collect(engine="streaming")
        )
        where = f"{self.where}, column '{t.column}' (treatment.column)"
        nulls = int(counts.filter(pl.col("arm").is_null())["rows"].sum())
        if nulls:
            raise ConfigError(f"{where}: {nulls} row(s) name no arm (null)")
        if t.propensity and int(counts["bad"].sum()):
            raise ConfigError(
                f"{self.where}, column '{t.propensity}' (treatment.propensity): "
                f"{int(counts['bad'].sum())} row(s) null or outside (0, 1]"
            )
        arms = sorted(set(counts["arm"]))
        if str(t.control) not in arms:
            raise ConfigError(
                f"{where}: no row has the control value {t.control!r} (treatment.control); "
                f"the arms are {arms}"
            )
        for split in SPLITS:
            present = set(counts.filter(pl.col("split") == split)["arm"])
            missing = [a for a in arms if a not in present]
            if missing:
                raise ConfigError(f"{where}: arm(s) {missing} have no rows in the {split} split")

    def _unassigned_reason(self) -> pl.Expr:
        """Why a row is in no split (read only on such rows)."""
        s = self.config.split
        if s.mode == "paths":
            return pl.lit("not in a split's path")
        if s.mode == "column":
            return (
                pl.when(pl.col(s.column).is_null())
                .then(pl.lit(f"null split column '{s.column}'"))
                .otherwise(pl.lit(f"'{s.column}' is not train / val / test"))
            )
        time, dtype = pl.col(self.config.time_column), self.schema[self.config.time_column]
        expr = pl.when(time.is_null()).then(pl.lit(f"null time ('{self.config.time_column}')"))
        if s.train_start is not None:
            start = pl.lit(_boundary(s.train_start, dtype), dtype=dtype)
            expr = expr.when(time < start).then(pl.lit(f"before the train start {s.train_start}"))
        if s.test_end is not None:
            end = pl.lit(_boundary(s.test_end, dtype), dtype=dtype)
            expr = expr.when(time > end).then(pl.lit(f"after the test end {s.test_end}"))
        return expr.otherwise(pl.lit("time not comparable (NaN)"))

    def _rule(self) -> str:
        s = self.config.split
        if s.mode == "paths":
            return ", ".join(f"{k}: {v}" for k, v in s.paths.items())
        if s.mode == "column":
            return f"split column '{s.column}': values train / val / test"
        return (
            f"time column '{self.config.time_column}', train_end={s.train_end}, "
            f"val_end={s.val_end}, test_end={s.test_end}"
        )

    def _skip_unreadable_pages(self) -> None:
        """Decode every row group of the columns a fit reads; leave out files that fail."""
        needed = set(self.columns_needed()) - set(self.derived) - {SPLIT_COLUMN}
        for file in list(self.files):
            err = _decode_error(file, needed)
            if err is not None:
                self.skipped[str(file)] = f"cannot read {file} (corrupt Parquet data?): {err}"
                self.files.remove(file)
        if not self.files:
            raise ConfigError(f"every Parquet file under {self.location} is unreadable")

    def unreadable(self, columns: list[str], err: Exception) -> ConfigError:
        """The error for a scan that failed: find the file (only on this error path)."""
        for file in self.files:
            file_err = _decode_error(file, set(columns))
            if file_err is not None:
                return ConfigError(f"cannot read {file} (corrupt Parquet data?): {file_err}")
        return ConfigError(f"cannot read {self.where}: {err}")

    # -- pieces for streaming -----------------------------------------------------------------

    @cached_property
    def dataset(self) -> pads.FileSystemDataset:
        """The same files as a pyarrow dataset, with polars' partition dtypes."""
        if not self.hive:
            return pads.dataset([str(f) for f in self.files], format="parquet")
        physical = set(pads.dataset(str(self.files[0]), format="parquet").schema.names)
        keys = [name for name in self.schema if name not in physical]
        arrow = pl.DataFrame(schema={k: self.schema[k] for k in keys}).to_arrow().schema
        partitioning = pads.partitioning(pa.schema(list(arrow)), flavor="hive") if keys else None
        return pads.dataset(
            [str(f) for f in self.files],
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=str(self.root),
        )

    @cached_property
    def pieces(self) -> list[Piece]:
        pieces = []
        for fragment in self.dataset.get_fragments():
            for group in fragment.split_by_row_group():
                rows = group.row_groups[0].num_rows
                if rows:
                    pieces.append(Piece(group, rows))
        return pieces

    def read_piece_columns(
        self, piece: Piece, columns: tuple[str, ...], positions: bool = False
    ) -> pl.DataFrame:
        """Some columns of one row group, as read (no filter, no joins); derived histories
        come from the same row group of the file's sidecar, as lists (or, with
        ``positions``, as the positions in ``events``)."""
        logged = [c for c in columns if c not in self.derived and c != SPLIT_COLUMN]
        derived = [c for c in columns if c in self.derived]
        try:
            table = piece.fragment.to_table(schema=self.dataset.schema, columns=logged)
            if derived:
                sidecar = pq.ParquetFile(self.sidecars[piece.path])
                group = piece.fragment.row_groups[0].id
                extra = sidecar.read_row_group(group, columns=derived)
                for name in derived:
                    table = table.append_column(name, extra[name])
            if SPLIT_COLUMN in columns:
                split = pa.array([self.split_of[piece.path]] * table.num_rows, pa.string())
                table = table.append_column(SPLIT_COLUMN, split)
            table = table.select(list(columns))
        except (pa.ArrowException, OSError) as err:
            raise ConfigError(f"cannot read {piece.path}: {err}") from err
        frame = pl.from_arrow(table)
        if positions or not derived:
            return frame
        return frame.with_columns(self._lists(frame[c], c) for c in derived)

    def read_piece(
        self, piece: Piece, split: SplitName, extra: tuple[str, ...] = (), positions: bool = False
    ) -> pl.DataFrame:
        """One row group's rows of the split, side tables joined (derived histories as
        ``read_piece_columns`` gives them)."""
        frame = self.read_piece_columns(piece, tuple(self.columns_needed(extra)), positions)
        return self.join_side_tables(frame.filter(self.split_filter(split)))


def _decode_error(file: Path, columns: set[str]) -> Exception | None:
    """Decode these columns of every row group of a file, one at a time: the error, if any."""
    try:
        parquet = pq.ParquetFile(file)
        names = [c for c in parquet.schema_arrow.names if c in columns]
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group, columns=names)
    except (pa.ArrowException, OSError) as err:
        return err
    return None


def _boundary(value: str | int, dtype: pl.DataType) -> object:
    """A split boundary from the config, as a value of the time column's dtype."""
    text = str(value)
    if dtype == pl.Date:
        return dt.date.fromisoformat(_iso_date(text))
    if isinstance(dtype, pl.Datetime):
        return dt.datetime.fromisoformat(_iso_date(text) if len(text) <= 10 else text)
    if dtype.is_integer():
        return int(text.replace("-", ""))
    if dtype == pl.String:
        return text
    raise ConfigError(f"time column of dtype {dtype} is not supported (date, datetime, int, str)")


def _iso_date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if text.isdigit() and len(text) == 8 else text
