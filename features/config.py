"""Dataset configs: which columns of a behaviour log are features, labels and time.

A dataset config (``configs/data/*.yaml``) declares the log, the side tables joined onto it,
the features (kind, side, embedding size, vocabulary limits, numeric transform), the tasks
(label column, group, loss weight) and the time split. Loading validates every key and value
up front, so a typo fails with the file and the key named, before any data is read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

Kind = Literal["categorical", "numeric", "sequence"]
Side = Literal["user", "item", "context"]
Transform = Literal["standardize", "log1p", "quantile_bucket"]
Pooling = Literal["mean", "target_attention", "search", "none"]
ATTENDED = ("target_attention", "search")  # poolings with a query (``target``)
SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")


class ConfigError(ValueError):
    """A dataset config (or the data it points to) does not fit the contract."""


@dataclass(frozen=True)
class FeatureSpec:
    """One model input. ``column`` defaults to ``name``.

    A ``sequence`` is a user's recent behaviours, most recent last, sharing the vocabulary (and
    the embeddings) of the categorical feature ``vocabulary_of``; at most ``max_len`` of the
    most recent are kept. It is either a list column of the log or a side table (``column``),
    or, with ``from_label``, derived from the log: for each impression, the values of
    ``vocabulary_of``'s column at the user's last ``max_len`` impressions whose label column
    ``from_label`` is 1, strictly before the impression's ``timestamp`` (ties excluded).
    Sequences with the same ``from_label`` and ``timestamp`` are aligned by position (e.g. the
    items of a history and their authors). ``pooling`` turns it into one vector: the mean, or
    DIN-style target attention with the embedding of ``target`` (default: ``vocabulary_of``,
    the candidate) as the query, or ``search`` (SIM / TWIN style, for long histories): the
    ``search_k`` behaviours most relevant to the candidate, then target attention over them.
    Relevance is the hard search of SIM with ``search_by`` (another sequence aligned with this
    one, e.g. the history's authors: the behaviours whose value equals the candidate's, most
    recent first) or else the soft search (the dot product of the behaviour's and the
    candidate's embeddings). ``none``: not pooled, only read by another's ``search_by``.
    """

    name: str
    kind: Kind
    side: Side
    column: str = ""
    embedding_dim: int = 16
    min_count: int = 1  # values seen fewer times fold into the unknown index 0
    max_size: int | None = None  # keep at most this many most frequent values
    hash_buckets: int | None = None  # categorical, integer ids: hashed, no fitted vocabulary
    transform: Transform = "standardize"  # numeric only
    buckets: int = 16  # quantile_bucket only
    max_len: int = 20  # sequence only
    vocabulary_of: str | None = None  # sequence only: the categorical feature it shares
    from_label: str | None = None  # sequence only: derived from the log's positives
    timestamp: str | None = None  # sequence only, derived: sub-day time column of the log
    pooling: Pooling = "mean"  # sequence only
    target: str | None = None  # target_attention or search: the query feature
    search_k: int = 50  # search only: behaviours kept for the attention
    search_by: str | None = None  # search only: an aligned sequence for hard search

    def __post_init__(self) -> None:
        if not self.column:
            object.__setattr__(self, "column", self.name)

    @property
    def embedded(self) -> bool:
        """Categorical features and bucketised numerics are looked up in the embedding table."""
        return self.kind == "categorical" or (
            self.kind == "numeric" and self.transform == "quantile_bucket"
        )

    @property
    def derived(self) -> bool:
        """A sequence derived from the log's own positives (not a logged list column)."""
        return self.kind == "sequence" and self.from_label is not None


@dataclass(frozen=True)
class TaskSpec:
    """One predicted behaviour. ``truth`` names a column of true probabilities (synthetic logs)."""

    name: str
    label: str
    group: str
    weight: float = 1.0
    truth: str | None = None


@dataclass(frozen=True)
class SideTable:
    """A user or item feature table (Parquet) joined onto the log by the user or item key."""

    path: Path
    key: Literal["user", "item"]
    columns: tuple[str, ...] | None = None  # default: the feature columns the log lacks


@dataclass(frozen=True)
class SplitSpec:
    """Which rows train, validate and test; one of three ways:

    - by time: train ``<= train_end`` (and ``>= train_start``), val ``<= val_end``, test
      after (``<= test_end``), on the dataset's ``time_column``;
    - by a column (``column``) whose values are ``train``, ``val`` and ``test``;
    - pre-split data: one path per split (``train``, ``val``, ``test``: a Parquet file or a
      directory each), the dataset's ``path`` left out.
    """

    train_end: str | int | None = None
    val_end: str | int | None = None
    test_end: str | int | None = None
    train_start: str | int | None = None
    column: str | None = None
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None

    @property
    def mode(self) -> Literal["time", "column", "paths"]:
        if self.column is not None:
            return "column"
        if any(p is not None for p in (self.train, self.val, self.test)):
            return "paths"
        return "time"

    @property
    def paths(self) -> dict[SplitName, Path]:
        return {"train": self.train, "val": self.val, "test": self.test}  # type: ignore[dict-item]


@dataclass(frozen=True)
class TreatmentSpec:
    """Uplift data: ``column`` names the arm each row received (categorical), ``control`` its
    value for no treatment; for logged (not randomised) data, ``propensity`` names the column
    of the probability, in (0, 1], that the row received the arm it did (rows are then
    weighted by its inverse in training and evaluation)."""

    column: str
    control: str | int
    propensity: str | None = None


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    user_key: str
    item_key: str
    features: tuple[FeatureSpec, ...]
    tasks: tuple[TaskSpec, ...]
    split: SplitSpec
    path: Path | None = None  # the log; absent when the split names a path per split
    time_column: str | None = None  # required by a time split; orders feature snapshots
    side_tables: tuple[SideTable, ...] = field(default=())
    note: str | None = None  # printed with ``ranker fit``'s report on this data (a known bias)
    treatment: TreatmentSpec | None = None  # uplift data: which arm each row received
    source: Path | None = None  # the YAML file this came from, for error messages

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def sequences(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "sequence"]

    def feature(self, name: str) -> FeatureSpec:
        return next(f for f in self.features if f.name == name)

    def with_path(self, path: str | Path) -> DatasetConfig:
        if self.split.mode == "paths":
            raise ConfigError(
                f"{self.source or 'dataset config'}: split names a path per split; "
                "a log_path does not apply"
            )
        return dataclasses.replace(self, path=Path(path))

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"dataset config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: Any, source: Path | None = None) -> DatasetConfig:
        where = str(source) if source else "dataset config"
        config = _build(cls, raw, where, exclude={"source"})
        # Relative paths resolve against the config file, so a config works from any directory.
        base = source.parent if source else Path.cwd()
        split = config.split
        paths = {k: _resolve(v, base) for k, v in split.paths.items() if v is not None}
        config = dataclasses.replace(
            config,
            source=source,
            path=_resolve(config.path, base) if config.path is not None else None,
            split=dataclasses.replace(split, **paths),
            side_tables=tuple(
                dataclasses.replace(t, path=_resolve(t.path, base)) for t in config.side_tables
            ),
        )
        _check(config, where)
        return config


def _resolve(path: Path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check(config: DatasetConfig, where: str) -> None:
    """Cross-field rules that single values cannot express."""
    if not config.features:
        raise ConfigError(f"{where}: 'features' is empty")
    if not config.tasks:
        raise ConfigError(f"{where}: 'tasks' is empty")
    for what, names in (
        ("feature", [f.name for f in config.features]),
        ("task", [t.name for t in config.tasks]),
    ):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{where}: duplicate {what} names {duplicates}")
    for i, spec in enumerate(config.features):
        at = f"{where}: features[{i}] ({spec.name})"
        if spec.embedding_dim < 1:
            raise ConfigError(f"{at}: embedding_dim must be >= 1, got {spec.embedding_dim}")
        if spec.min_count < 1:
            raise ConfigError(f"{at}: min_count must be >= 1, got {spec.min_count}")
        if spec.max_size is not None and spec.max_size < 1:
            raise ConfigError(f"{at}: max_size must be >= 1, got {spec.max_size}")
        if spec.hash_buckets is not None:
            _check_hashed(spec, at)
        if spec.transform == "quantile_bucket" and spec.buckets < 2:
            raise ConfigError(f"{at}: buckets must be >= 2, got {spec.buckets}")
        if spec.kind == "sequence":
            _check_sequence(config, spec, at)
        else:
            for key in SEQUENCE_KEYS:
                if getattr(spec, key) != getattr(SEQUENCE_DEFAULTS, key):
                    raise ConfigError(f"{at}: {key} is only for kind: sequence")
    for i, task in enumerate(config.tasks):
        if task.weight < 0:
            raise ConfigError(f"{where}: tasks[{i}] ({task.name}): weight must be >= 0")
    _check_split(config, where)
    treatment = config.treatment
    if treatment is not None:
        clash = {f.column for f in config.features} | {t.label for t in config.tasks}
        for key in ("column", "propensity"):
            if getattr(treatment, key) in clash:
                raise ConfigError(
                    f"{where}: treatment.{key} '{getattr(treatment, key)}' is also a feature "
                    "or label column (an S-learner sees the arm through the treatment itself)"
                )


def _check_split(config: DatasetConfig, where: str) -> None:
    split = config.split
    time_keys = ("train_end", "val_end", "test_end", "train_start")
    given = {k for k in (*time_keys, "column", "train", "val", "test") if getattr(split, k)}
    modes = {
        "time": given & set(time_keys),
        "column": given & {"column"},
        "paths": given & {"train", "val", "test"},
    }
    if sum(bool(keys) for keys in modes.values()) != 1:
        raise ConfigError(
            f"{where}: split: give one of train_end + val_end (by time), column (a column "
            f"naming each row's split) or train + val + test (a path each); got {sorted(given)}"
        )
    if split.mode == "paths":
        missing = [k for k in ("train", "val", "test") if getattr(split, k) is None]
        if missing:
            raise ConfigError(f"{where}: split: missing the path of {missing}")
        if config.path is not None:
            raise ConfigError(f"{where}: path: the split names a path per split; leave it out")
        return
    if config.path is None:
        raise ConfigError(f"{where}: missing required key 'path'")
    if split.mode == "column":
        return
    if split.train_end is None or split.val_end is None:
        raise ConfigError(f"{where}: split: a time split needs train_end and val_end")
    if config.time_column is None:
        raise ConfigError(f"{where}: missing required key 'time_column' (for the time split)")
    if _order_key(split.train_end) >= _order_key(split.val_end):
        raise ConfigError(f"{where}: split.train_end must come before split.val_end")
    if split.test_end is not None and _order_key(split.val_end) >= _order_key(split.test_end):
        raise ConfigError(f"{where}: split.val_end must come before split.test_end")


SEQUENCE_KEYS = (
    "max_len", "vocabulary_of", "from_label", "timestamp", "pooling", "target", "search_k",
    "search_by",
)  # fmt: skip
SEQUENCE_DEFAULTS = FeatureSpec("_", "sequence", "user")


def _check_search(config: DatasetConfig, spec: FeatureSpec, at: str) -> None:
    """``search_k`` / ``search_by`` belong to pooling: search; ``search_by`` names a sequence
    aligned with this one (the same events: derived from the same label and timestamp, or
    both logged, and the same ``max_len``)."""
    sequences = {f.name: f for f in config.features if f.kind == "sequence"}
    if spec.pooling == "none" and not any(f.search_by == spec.name for f in sequences.values()):
        raise ConfigError(
            f"{at}: pooling: none is for a sequence another one searches by (its search_by)"
        )
    if spec.pooling != "search":
        for key in ("search_k", "search_by"):
            if getattr(spec, key) != getattr(SEQUENCE_DEFAULTS, key):
                raise ConfigError(f"{at}: {key} is only for pooling: search")
        return
    if spec.search_k < 1:
        raise ConfigError(f"{at}: search_k must be >= 1, got {spec.search_k}")
    if spec.search_by is None:
        return
    by = sequences.get(spec.search_by)
    if by is None or by.name == spec.name:
        raise ConfigError(
            f"{at}: search_by: {spec.search_by!r} names no other sequence feature "
            f"(sequences: {sorted(set(sequences) - {spec.name})})"
        )
    if (by.from_label, by.timestamp, by.max_len) != (spec.from_label, spec.timestamp, spec.max_len):
        raise ConfigError(
            f"{at}: search_by: '{by.name}' is not aligned with '{spec.name}': both must be "
            "derived from the same from_label and timestamp (or both logged) with the same max_len"
        )


def _check_sequence(config: DatasetConfig, spec: FeatureSpec, at: str) -> None:
    categorical = {f.name: f for f in config.features if f.kind == "categorical"}
    if spec.side not in ("user", "context"):
        raise ConfigError(f"{at}: side: a sequence is a user or context feature, not {spec.side}")
    if spec.max_len < 1:
        raise ConfigError(f"{at}: max_len must be >= 1, got {spec.max_len}")
    for key in ("vocabulary_of", "target"):
        value = getattr(spec, key)
        if (key == "vocabulary_of" or value is not None) and value not in categorical:
            raise ConfigError(
                f"{at}: {key}: {value!r} names no categorical feature "
                f"(categorical features: {sorted(categorical)})"
            )
    shared = categorical[spec.vocabulary_of].embedding_dim
    if spec.embedding_dim not in (SEQUENCE_DEFAULTS.embedding_dim, shared):
        raise ConfigError(
            f"{at}: embedding_dim: a sequence shares the embeddings of '{spec.vocabulary_of}' "
            f"({shared}); leave it out"
        )
    if spec.target is not None and spec.pooling not in ATTENDED:
        raise ConfigError(f"{at}: target is only for pooling: target_attention or search")
    _check_search(config, spec, at)
    if spec.pooling in ATTENDED:
        target = categorical[spec.target or spec.vocabulary_of]
        if target.embedding_dim != categorical[spec.vocabulary_of].embedding_dim:
            raise ConfigError(
                f"{at}: target: '{target.name}' embeds in {target.embedding_dim} dimensions, "
                f"the sequence in {categorical[spec.vocabulary_of].embedding_dim}"
            )
    if spec.from_label is not None and not spec.timestamp:
        raise ConfigError(
            f"{at}: timestamp: a history derived from '{spec.from_label}' needs the log's "
            "timestamp column (sub-day resolution) to order events"
        )
    if spec.from_label is not None and spec.side != "user":
        raise ConfigError(f"{at}: side: a history derived from the log is a user feature")
    if spec.from_label is None and spec.timestamp is not None:
        raise ConfigError(f"{at}: timestamp is only for a derived sequence (with from_label)")
    for key in ("min_count", "max_size", "hash_buckets", "transform", "buckets"):
        if getattr(spec, key) != getattr(SEQUENCE_DEFAULTS, key):
            raise ConfigError(f"{at}: {key} does not apply to a sequence")


def _check_hashed(spec: FeatureSpec, at: str) -> None:
    if spec.kind == "numeric":
        raise ConfigError(f"{at}: hash_buckets is for a categorical feature")
    if spec.hash_buckets < 1:
        raise ConfigError(f"{at}: hash_buckets must be >= 1, got {spec.hash_buckets}")
    if spec.min_count != 1 or spec.max_size is not None:
        raise ConfigError(f"{at}: min_count / max_size shape a fitted vocabulary, not hash_buckets")


def _order_key(value: str | int) -> str:
    # Boundaries are dates (2024-01-12), compact dates (20240112) or timestamps: compare digits.
    return "".join(ch for ch in str(value) if ch.isdigit()).ljust(20, "0")


def _build(cls: type, raw: Any, where: str, exclude: set[str] = frozenset()) -> Any:
    """Build a config dataclass from a mapping, naming the file and key of anything wrong."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key '{name}'")
            continue
        values[name] = _coerce(hints[name], raw[name], f"{where}: {name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, dt.date):
        return value.isoformat()  # YAML reads 2024-01-12 as a date
    if hint in (str, int, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
