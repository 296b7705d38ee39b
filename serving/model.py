"""A ranker ONNX model ready to score requests: the session, its input layout, feature tables.

Everything the service needs is in the model file's metadata (``ranker.*``, written by
``ranker export``; the contract is ``features.contract``): the raw input columns with their
side (user / item / context), dtype and, for a sequence, length; the user and item key
columns; the tasks. Columns are typed and missing values marked by the same code that feeds
the graph at export (``features.contract.as_input``). User and item feature tables (Parquet
snapshots, latest value per key; the user's latest histories) fill in whatever a request does
not send; inline values override them. This module imports neither torch nor lightning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import polars as pl

from features.contract import (
    ARM_OUTPUT,
    INT64,
    META,
    MISSING,
    NULL_INT,
    NULL_STRING,
    NUMPY_TYPE,
    OUTPUT,
    UPLIFT,
    RawInput,
    as_input,
    flatten_recent,
    graph_digest,
    missing,
    parse_id,
    right_aligned,
)


class ModelError(ValueError):
    """The model or a feature table cannot be served (raised at start-up or reload)."""


class RequestError(ValueError):
    """A request value the model cannot take; ``loc`` names the field (answered with a 422)."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)
        self.message = message


class FeatureTable:
    """A Parquet snapshot keyed by user or item id, held as sorted columnar arrays.

    ``lookup(ids)`` finds N ids with one ``searchsorted``: no per-row Python. A sequence column
    is held flat (each row's most recent values, and offsets), not padded: 10M users' 50-long
    histories of string ids would otherwise be 500M object references.
    """

    def __init__(self, path: Path, key: str, columns: Sequence[RawInput]) -> None:
        frame = pl.read_parquet(path)
        if key not in frame.columns:
            raise ModelError(f"feature table {path} has no key column '{key}'")
        self.path, self.key = path, key
        self.columns = [c for c in columns if c.name in frame.columns and c.name != key]
        frame = frame.unique(subset=key, keep="last").sort(key)
        key_dtype = "int64" if frame[key].dtype.is_integer() else "string"
        self.keys = as_input(frame[key], key_dtype)
        self.values = {
            c.name: as_input(frame[c.name], c.dtype) for c in self.columns if not c.is_sequence
        }
        self.sequences: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # values, offsets
        for c in (c for c in self.columns if c.is_sequence):
            values, counts = flatten_recent(frame[c.name], c.length)
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            self.sequences[c.name] = (as_input(values, c.dtype), offsets)

    def sequence(self, column: RawInput, row: int) -> np.ndarray:
        """One row's sequence as the graph takes it: ``[1, L]``, right-aligned."""
        values, offsets = self.sequences[column.name]
        kept = values[offsets[row] : offsets[row + 1]]
        counts = np.array([len(kept)], dtype=np.int64)
        return right_aligned(kept, counts, column.length, MISSING[column.dtype])

    def sequence_rows(self, column: RawInput, rows: np.ndarray, found: np.ndarray) -> np.ndarray:
        """Several rows' sequences at once, ``[len(rows), L]`` (empty where not ``found``)."""
        values, offsets = self.sequences[column.name]
        starts = offsets[rows]
        counts = np.where(found, offsets[rows + 1] - starts, 0)
        firsts = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        kept = values[firsts + np.arange(counts.sum())]
        return right_aligned(kept, counts, column.length, MISSING[column.dtype])

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id in the table, found mask); ids are cast to the key's type first."""
        n = len(ids)
        if len(self.keys) == 0:
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        if self.keys.dtype == object:
            wanted = np.array([str(i) for i in ids], dtype=object)
        elif all(type(i) is int and INT64[0] <= i <= INT64[1] for i in ids):  # the usual case
            wanted = np.asarray(ids, dtype=np.int64)
        else:  # anything else cannot match an integer key
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        rows = np.searchsorted(self.keys, wanted).clip(0, len(self.keys) - 1)
        return rows, self.keys[rows] == wanted


def session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    """One request is one small batch: run its operators one after another on ``threads``
    intra-op threads (parallel inter-op scheduling only adds hand-offs for graphs this
    narrow), with every graph optimisation on. Threads spin-wait between operators: on two
    cores that shortens in-process latency and did not lengthen the HTTP tail
    (``benchmarks/serve.py`` measures each choice; RESULTS.md has the figures)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    return options


@dataclass
class Scorer:
    """A loaded model: ``score(user, context, candidates)`` -> probabilities ``[N, T]``; an
    uplift model (``arms``) also ``uplift(users)`` -> every arm's probabilities and uplift."""

    path: Path
    name: str
    version: str
    source: str
    threads: int | None = None
    user_table_path: Path | None = None
    item_table_path: Path | None = None
    optimized_path: Path | None = None  # the optimised graph export saved (used if it matches)
    tasks: list[str] = field(init=False)
    outputs: list[str] = field(init=False)  # the graph's named outputs, ``OUTPUT`` among them
    columns: list[RawInput] = field(init=False)
    arms: list[str] = field(init=False)  # an uplift model's arms, control first; [] otherwise

    def __post_init__(self) -> None:
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as err:  # protobuf raises its own DecodeError, among others
            raise ModelError(f"{self.path} is not an ONNX model: {err}") from None
        meta = {p.key: p.value for p in proto.metadata_props}
        if META.INPUTS not in meta:
            raise ModelError(f"{self.path} is not a ranker model (no ranker.* metadata)")
        self.tasks = json.loads(meta[META.TASKS])
        self.columns = [RawInput(**c) for c in json.loads(meta[META.INPUTS])]
        self.user_key, self.item_key = meta[META.USER_KEY], meta[META.ITEM_KEY]
        if (int(meta[META.NULL_INT]), meta[META.NULL_STRING]) != (NULL_INT, NULL_STRING):
            raise ModelError(f"{self.path} marks missing values differently from this service")
        self.model_class = meta.get(META.MODEL, "")
        self.arms = json.loads(meta.get(META.ARMS, "[]"))
        self.quantized = meta.get(META.QUANTIZED, "")
        self.graph = self._saved_optimization() or self.path
        try:
            self.session = ort.InferenceSession(
                str(self.graph), session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise ModelError(f"onnxruntime cannot load {self.path}: {err}") from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = [c.name for c in self.columns if c.name not in graph_inputs]
        self.outputs = [o.name for o in self.session.get_outputs()]
        if missing or OUTPUT not in self.outputs:
            raise ModelError(f"{self.path} lacks inputs {missing} or the '{OUTPUT}' output")
        lacking = {ARM_OUTPUT, UPLIFT} - set(self.outputs) if self.arms else set()
        if lacking:
            raise ModelError(f"{self.path} names arms but lacks the outputs {sorted(lacking)}")
        self.by_name = {c.name: c for c in self.columns}
        self.user_table = self._table(self.user_table_path, self.user_key, "user")
        self.item_table = self._table(self.item_table_path, self.item_key, "item")

    def _saved_optimization(self) -> Path | None:
        """The optimised graph, if it was made from this very file (else start-up optimises)."""
        saved = self.optimized_path
        if saved is None or not saved.is_file():
            return None
        try:
            proto = onnx.load(str(saved), load_external_data=False)
        except Exception:
            return None
        made_from = {p.key: p.value for p in proto.metadata_props}.get(META.OPTIMIZED_FROM)
        return saved if made_from == graph_digest(self.path) else None

    def _table(self, path: Path | None, key: str, side: str) -> FeatureTable | None:
        if path is None:
            return None
        if not path.exists():
            raise ModelError(f"{side} feature table {path} does not exist")
        columns = [c for c in self.columns if c.side == side]
        return FeatureTable(path, key, columns)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "model": self.model_class,
            "graph": "optimized at export" if self.graph != self.path else "optimized at start-up",
            "quantized": self.quantized or "no",
            "tasks": self.tasks,
            **({"arms": self.arms} if self.arms else {}),
            "outputs": self.outputs,
            "user_key": self.user_key,
            "item_key": self.item_key,
            "inputs": [c.to_dict() for c in self.columns],
            "user_table_rows": len(self.user_table) if self.user_table else 0,
            "item_table_rows": len(self.item_table) if self.item_table else 0,
        }

    # -- one request ----------------------------------------------------------------------------

    def _value(self, column: RawInput, value: Any, loc: Sequence[str | int]) -> Any:
        """A client's value as the column's type; None = missing."""
        if value is None:
            return MISSING[column.dtype]
        if column.dtype == "int64":
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return parse_id(int(value), column.dtype)  # bool is an int too
            raise RequestError(loc, f"'{column.name}' takes an integer id, got {value!r}")
        if column.dtype == "string":
            if isinstance(value, float):
                raise RequestError(loc, f"'{column.name}' takes a string, got {value!r}")
            return str(value)
        if isinstance(value, str):
            raise RequestError(loc, f"'{column.name}' takes a number, got {value!r}")
        return float(value)  # the schema already refused NaN / inf

    def _history(self, column: RawInput, ids: Sequence[Any]) -> np.ndarray:
        """An inline history as the graph's ``[1, L]``: the most recent ``L`` ids (most recent
        last), each parsed as an id of the column's type (what does not parse is unknown)."""
        recent = [parse_id(i, column.dtype) for i in ids[-column.length :]]
        values = np.array(recent, dtype=NUMPY_TYPE[column.dtype])
        counts = np.array([len(recent)], dtype=np.int64)
        return right_aligned(values, counts, column.length, MISSING[column.dtype])

    def _ids(self, column: RawInput, ids: Sequence[Any]) -> np.ndarray:
        """Candidate ids as the key column's type (fast path: all integers)."""
        if column.dtype == "int64" and all(type(i) is int for i in ids):
            try:
                return np.asarray(ids, dtype=np.int64)
            except OverflowError:
                pass  # some beyond int64: one by one below
        np_type = np.int64 if column.dtype == "int64" else object
        return np.array([parse_id(i, column.dtype) for i in ids], dtype=np_type)

    def _check(
        self, features: Mapping[str, Any], sides: tuple[str, ...], loc: list, sequences: bool
    ) -> None:
        for name in features:
            column = self.by_name.get(name)
            if column is None or column.side not in sides or column.is_sequence != sequences:
                allowed = sorted(
                    c.name for c in self.columns if c.side in sides and c.is_sequence == sequences
                )
                raise RequestError(
                    [*loc, name], f"unknown feature '{name}' here (known: {allowed})"
                )

    def feeds(
        self,
        user_id: Any,
        user_features: Mapping[str, Any],
        context: Mapping[str, Any],
        candidate_ids: Sequence[Any],
        candidate_features: Sequence[Mapping[str, Any] | None],
        histories: Mapping[str, Sequence[Any]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Graph inputs: 1-row user and context columns (``[1, L]`` sequences), N-row item
        columns."""
        histories = histories or {}
        self._check(user_features, ("user",), ["body", "user", "features"], sequences=False)
        self._check(context, ("context",), ["body", "context"], sequences=False)
        self._check(histories, ("user", "context"), ["body", "user", "history"], sequences=True)
        user_row = None
        if self.user_table is not None:
            rows, found = self.user_table.lookup([user_id])
            user_row = int(rows[0]) if found[0] else None
        items = self._item_feeds(candidate_ids, candidate_features)
        feeds: dict[str, np.ndarray] = {}
        for column in self.columns:
            name = column.name
            if column.side == "item":
                feeds[name] = items[name]
            elif column.is_sequence and name in histories:
                feeds[name] = self._history(column, histories[name])
            elif column.is_sequence:
                feeds[name] = self._from_user_table(column, user_row)
            else:
                value = self._request_value(column, user_id, user_features, context, user_row)
                feeds[name] = np.array([value], dtype=NUMPY_TYPE[column.dtype])
        return feeds

    def _request_value(
        self,
        column: RawInput,
        user_id: Any,
        user_features: Mapping[str, Any],
        context: Mapping[str, Any],
        user_row: int | None,
    ) -> Any:
        """A user or context column's one value: the request's, else the user table's."""
        name = column.name
        if name == self.user_key:
            return parse_id(user_id, column.dtype)
        if column.side == "user" and name in user_features:
            return self._value(column, user_features[name], ["body", "user", "features", name])
        if column.side == "context" and name in context:
            return self._value(column, context[name], ["body", "context", name])
        return self._from_user_table(column, user_row)[0]

    def _from_user_table(self, column: RawInput, user_row: int | None) -> np.ndarray:
        """The column's row of the user table (``[1]`` or ``[1, L]``), missing if none."""
        table = self.user_table
        if user_row is not None and column.side == "user":
            if column.name in table.sequences:
                return table.sequence(column, user_row)
            if column.name in table.values:
                return table.values[column.name][user_row : user_row + 1]
        shape = (1, column.length) if column.is_sequence else (1,)
        return missing(shape, column.dtype)

    def _item_feeds(
        self, ids: Sequence[Any], inline: Sequence[Mapping[str, Any] | None]
    ) -> dict[str, np.ndarray]:
        """Every item column ``[N]``: the ids, the item table's values, inline overrides."""
        table, n = self.item_table, len(ids)
        rows = found = None
        if table is not None:
            rows, found = table.lookup(ids)
        overrides = [(i, f) for i, f in enumerate(inline) if f]
        feeds = {}
        for column in (c for c in self.columns if c.side == "item"):
            name, np_type = column.name, NUMPY_TYPE[column.dtype]
            if name == self.item_key:
                feeds[name] = self._ids(column, ids)
                continue
            array = missing(n, column.dtype)
            if table is not None and name in table.values:
                array = np.where(found, table.values[name][rows], array).astype(np_type)
            for i, features in overrides:
                if name in features:
                    loc = ["body", "candidates", i, "features", name]
                    array[i] = self._value(column, features[name], loc)
            feeds[name] = array
        return feeds

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT], feeds)[0]

    # -- an uplift request: N users, every arm --------------------------------------------------

    def user_feeds(
        self,
        user_ids: Sequence[Any],
        user_features: Sequence[Mapping[str, Any]],
        context: Mapping[str, Any],
        histories: Sequence[Mapping[str, Sequence[Any]]],
    ) -> dict[str, np.ndarray]:
        """Graph inputs of N users, one row each (``[N]``, ``[N, L]`` sequences): the user
        table's values found with one lookup, the request's values over them; the context is
        shared; an item column (an uplift model has none of its own) is missing."""
        for i, (features, history) in enumerate(zip(user_features, histories, strict=True)):
            self._check(features, ("user",), ["body", "users", i, "features"], sequences=False)
            self._check(history, ("user", "context"), ["body", "users", i, "history"], True)
        self._check(context, ("context",), ["body", "context"], sequences=False)
        rows = found = None
        if self.user_table is not None:
            rows, found = self.user_table.lookup(user_ids)
        feeds: dict[str, np.ndarray] = {}
        for column in self.columns:
            feeds[column.name] = self._user_column(column, user_ids, context, rows, found)
        for i, (features, history) in enumerate(zip(user_features, histories, strict=True)):
            for name, value in features.items():
                loc = ["body", "users", i, "features", name]
                feeds[name][i] = self._value(self.by_name[name], value, loc)
            for name, ids in history.items():
                feeds[name][i] = self._history(self.by_name[name], ids)[0]
        return feeds

    def _user_column(
        self,
        column: RawInput,
        user_ids: Sequence[Any],
        context: Mapping[str, Any],
        rows: np.ndarray | None,
        found: np.ndarray | None,
    ) -> np.ndarray:
        """One column of N users, before the request's own values: the ids, the context's
        value, the user table's (missing where a user is not in it)."""
        n, name, table = len(user_ids), column.name, self.user_table
        if name == self.user_key:
            return self._ids(column, user_ids)
        if column.side == "context" and name in context:
            value = self._value(column, context[name], ["body", "context", name])
            return np.full(n, value, dtype=NUMPY_TYPE[column.dtype])
        if column.side == "user" and table is not None:
            if name in table.sequences:
                return table.sequence_rows(column, rows, found)
            if name in table.values:
                return np.where(found, table.values[name][rows], missing(n, column.dtype)).astype(
                    NUMPY_TYPE[column.dtype]
                )
        return missing((n, column.length) if column.is_sequence else n, column.dtype)

    def uplift(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Every arm's probabilities ``[N, A, T]`` (control first) and each treatment's
        uplift against control ``[N, A-1, T]``."""
        probabilities, uplift = self.session.run([ARM_OUTPUT, UPLIFT], feeds)
        return probabilities, uplift
