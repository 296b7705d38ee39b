"""A ranker ONNX model ready to score requests: the session, its input layout, feature tables.

Everything the service needs is in the model file's metadata (``ranker.*``, written by
``ranker export``): the raw input columns with their side (user / item / context) and dtype,
the user and item key columns, the tasks. Columns are typed and missing values marked by the
same code that feeds the graph at export (``features.onnx_graph.as_input``). User and item
feature tables (Parquet snapshots, latest value per key) fill in whatever a request does not
send; inline values override them. This module imports neither torch nor lightning.
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

from features.onnx_graph import MISSING, NULL_INT, NULL_STRING, as_input

OUTPUT = "probabilities"
INT64 = (-(2**63), 2**63 - 1)


class ModelError(ValueError):
    """The model or a feature table cannot be served (raised at start-up or reload)."""


class RequestError(ValueError):
    """A request value the model cannot take; ``loc`` names the field (answered with a 422)."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)
        self.message = message


@dataclass(frozen=True)
class Column:
    name: str
    side: str  # user | item | context
    dtype: str  # int64 | string | float64


class FeatureTable:
    """A Parquet snapshot keyed by user or item id, held as sorted columnar arrays.

    ``lookup(ids)`` finds N ids with one ``searchsorted``: no per-row Python.
    """

    def __init__(self, path: Path, key: str, columns: Sequence[Column]) -> None:
        frame = pl.read_parquet(path)
        if key not in frame.columns:
            raise ModelError(f"feature table {path} has no key column '{key}'")
        self.path, self.key = path, key
        self.columns = [c for c in columns if c.name in frame.columns and c.name != key]
        frame = frame.unique(subset=key, keep="last").sort(key)
        key_dtype = "int64" if frame[key].dtype.is_integer() else "string"
        self.keys = as_input(frame[key], key_dtype)
        self.values = {c.name: as_input(frame[c.name], c.dtype) for c in self.columns}

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
    cores that halves in-process latency at 500 candidates and did not lengthen the HTTP tail
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
    """A loaded model: ``score(user, context, candidates)`` -> probabilities ``[N, T]``."""

    path: Path
    name: str
    version: str
    source: str
    threads: int | None = None
    user_table_path: Path | None = None
    item_table_path: Path | None = None
    tasks: list[str] = field(init=False)
    columns: list[Column] = field(init=False)

    def __post_init__(self) -> None:
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as err:  # protobuf raises its own DecodeError, among others
            raise ModelError(f"{self.path} is not an ONNX model: {err}") from None
        meta = {p.key: p.value for p in proto.metadata_props}
        if "ranker.inputs" not in meta:
            raise ModelError(f"{self.path} is not a ranker model (no ranker.* metadata)")
        self.tasks = json.loads(meta["ranker.tasks"])
        self.columns = [Column(**c) for c in json.loads(meta["ranker.inputs"])]
        self.user_key, self.item_key = meta["ranker.user_key"], meta["ranker.item_key"]
        if (int(meta["ranker.null_int"]), meta["ranker.null_string"]) != (NULL_INT, NULL_STRING):
            raise ModelError(f"{self.path} marks missing values differently from this service")
        self.model_class = meta.get("ranker.model", "")
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise ModelError(f"onnxruntime cannot load {self.path}: {err}") from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = [c.name for c in self.columns if c.name not in graph_inputs]
        if missing or [o.name for o in self.session.get_outputs()] != [OUTPUT]:
            raise ModelError(f"{self.path} lacks inputs {missing} or the '{OUTPUT}' output")
        self.by_name = {c.name: c for c in self.columns}
        self.user_table = self._table(self.user_table_path, self.user_key, "user")
        self.item_table = self._table(self.item_table_path, self.item_key, "item")

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
            "tasks": self.tasks,
            "user_key": self.user_key,
            "item_key": self.item_key,
            "inputs": [c.__dict__ for c in self.columns],
            "user_table_rows": len(self.user_table) if self.user_table else 0,
            "item_table_rows": len(self.item_table) if self.item_table else 0,
        }

    # -- one request ----------------------------------------------------------------------------

    def _value(self, column: Column, value: Any, loc: Sequence[str | int]) -> Any:
        """A client's value as the column's type; None = missing."""
        if value is None:
            return MISSING[column.dtype]
        if column.dtype == "int64":
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return self._int64(int(value))  # bool is an int too
            raise RequestError(loc, f"'{column.name}' takes an integer id, got {value!r}")
        if column.dtype == "string":
            if isinstance(value, float):
                raise RequestError(loc, f"'{column.name}' takes a string, got {value!r}")
            return str(value)
        if isinstance(value, str):
            raise RequestError(loc, f"'{column.name}' takes a number, got {value!r}")
        return float(value)  # the schema already refused NaN / inf

    def _int64(self, value: int) -> int:
        """Beyond int64 no vocabulary holds it: the unknown bucket."""
        return value if INT64[0] < value <= INT64[1] else NULL_INT

    def _id(self, column: Column, value: Any) -> Any:
        """An id as the key column's type. The schema allows ints and strings; a string that
        is not an integer cannot be in an integer vocabulary: the unknown bucket."""
        if column.dtype != "int64":
            return str(value)
        if isinstance(value, str):
            text = value.strip()
            digits = text[1:] if text[:1] in "+-" else text
            return self._int64(int(text)) if digits.isdigit() else NULL_INT
        return self._int64(value)

    def _ids(self, column: Column, ids: Sequence[Any]) -> np.ndarray:
        """Candidate ids as the key column's type (fast path: all integers)."""
        if column.dtype == "int64" and all(type(i) is int for i in ids):
            try:
                return np.asarray(ids, dtype=np.int64)
            except OverflowError:
                pass  # some beyond int64: one by one below
        np_type = np.int64 if column.dtype == "int64" else object
        return np.array([self._id(column, i) for i in ids], dtype=np_type)

    def _check(self, features: Mapping[str, Any], sides: tuple[str, ...], loc: list) -> None:
        for name in features:
            column = self.by_name.get(name)
            if column is None or column.side not in sides:
                allowed = sorted(c.name for c in self.columns if c.side in sides)
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
    ) -> dict[str, np.ndarray]:
        """Graph inputs: 1-row user and context columns, N-row item columns."""
        self._check(user_features, ("user",), ["body", "user", "features"])
        self._check(context, ("context",), ["body", "context"])
        n = len(candidate_ids)
        user_row = found_user = None
        if self.user_table is not None:
            rows, found = self.user_table.lookup([user_id])
            user_row, found_user = int(rows[0]), bool(found[0])
        item_rows = item_found = None
        if self.item_table is not None:
            item_rows, item_found = self.item_table.lookup(candidate_ids)
        inline = [(i, f) for i, f in enumerate(candidate_features) if f]
        feeds: dict[str, np.ndarray] = {}
        for column in self.columns:
            name = column.name
            np_type = {"int64": np.int64, "string": object, "float64": np.float64}[column.dtype]
            if column.side == "item":
                if name == self.item_key:
                    feeds[name] = self._ids(column, candidate_ids)
                    continue
                missing = MISSING[column.dtype]
                array = np.full(n, missing, dtype=np_type)
                table = self.item_table
                if table is not None and name in table.values:
                    array = np.where(item_found, table.values[name][item_rows], array)
                    array = array.astype(np_type)
                for i, features in inline:
                    if name in features:
                        loc = ["body", "candidates", i, "features", name]
                        array[i] = self._value(column, features[name], loc)
                feeds[name] = array
            else:
                if name == self.user_key:
                    value = self._id(column, user_id)
                elif column.side == "user" and name in user_features:
                    loc = ["body", "user", "features", name]
                    value = self._value(column, user_features[name], loc)
                elif column.side == "context" and name in context:
                    value = self._value(column, context[name], ["body", "context", name])
                elif column.side == "user" and found_user and name in self.user_table.values:
                    value = self.user_table.values[name][user_row]
                else:
                    value = MISSING[column.dtype]
                feeds[name] = np.array([value], dtype=np_type)
        return feeds

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT], feeds)[0]


@dataclass(frozen=True)
class Fusion:
    """How task probabilities become one ranking score: ``sum`` = sum_t w_t p_t,
    ``product`` = prod_t p_t ** w_t (computed as exp(sum_t w_t log p_t))."""

    kind: str = "sum"
    weights: Mapping[str, float] = field(default_factory=dict)  # task -> weight; absent = 1

    def vector(self, tasks: Sequence[str]) -> np.ndarray:
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise ModelError(f"fusion weights name tasks the model lacks: {unknown} ({tasks})")
        return np.array([float(self.weights.get(t, 1.0)) for t in tasks])

    def __call__(self, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        p = probs.astype(np.float64)
        if self.kind == "product":
            return np.exp(np.log(np.clip(p, 1e-12, 1.0)) @ weights)
        return p @ weights
