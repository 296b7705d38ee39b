"""The contract between an exported model and the scoring service, defined once.

``ranker export`` writes it and ``ranker serve`` reads it; both import it from here:

* the graph's inputs: one per raw column (``RawInput``: name, side, dtype, and for a
  sequence its length), 1-D ``[rows]`` for a scalar column, 2-D ``[rows, length]`` for a
  sequence; item columns have N rows (the candidates), user and context columns 1 (a request)
  or N (batch scoring);
* how a raw value becomes a graph value (``as_input``): integers and strings as logged,
  numbers as float64; missing values as ``MISSING`` markers that no vocabulary holds; an
  integer id that does not parse is missing; a sequence keeps its most recent ``length``
  values, right-aligned (most recent last), padded with the missing marker;
* the outputs: a model returns named tensors (``LOGITS`` ``[B, T]`` for every ranker, more
  names for other kinds of model); the graph has one output per name (``graph_output``), the
  ranking output being ``OUTPUT``;
* the fusion of task probabilities into one ranking score (``Fusion``), the same for
  ``ranker predict`` and ``ranker serve``;
* the metadata keys (``META``) and the feature-table files.

Light on purpose (numpy and polars): the service imports it without torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import polars as pl
import pyarrow as pa

LOGITS = "logits"  # every model's output: per-task logits [B, T] (the one the loss reads)


def is_logits(name: str) -> bool:
    """Whether a model output holds per-task logits (its last axis the tasks): ``logits``, or
    any name ending in ``_logits`` (e.g. an uplift model's ``arm_logits [B, A, T]``)."""
    return name == LOGITS or name.endswith("_" + LOGITS)


def graph_output(name: str) -> str:
    """The exported graph's output for a model output: logits become calibrated probabilities
    (``logits`` -> ``probabilities``, ``arm_logits`` -> ``arm_probabilities``); any other
    output keeps its name and values."""
    return name.removesuffix(LOGITS) + "probabilities" if is_logits(name) else name


OUTPUT = graph_output(LOGITS)  # the ranking output the service reads: "probabilities" [N, T]
# An uplift model's output (data with a ``treatment``): per-task logits of every arm, control
# first, ``[B, A, T]``; ``logits`` is then the observed arm's (control where none is given).
ARM_LOGITS = "arm_logits"
ARM_OUTPUT = graph_output(ARM_LOGITS)  # "arm_probabilities" [N, A, T]
UPLIFT = "uplift"  # the graph's uplift of each arm against control, [N, A-1, T] (probabilities)
# A hashed categorical feature (``hash_buckets: N``): id -> 1 + ((id mod P) * A + C) mod P mod N,
# computed the same way by the polars transform and inside the graph (int64, no overflow:
# (P - 1) * A + C < 2**63); 0 stays the missing / unparsable index.
HASH_PRIME, HASH_MULTIPLIER, HASH_INCREMENT = 2_147_483_647, 48_271, 12_345
NULL_INT = -(2**63)  # int64 min: a missing integer id
NULL_STRING = "\x00"  # a missing string category
MISSING: dict[str, Any] = {"int64": NULL_INT, "string": NULL_STRING, "float64": float("nan")}
NUMPY_TYPE: dict[str, Any] = {"int64": np.int64, "string": object, "float64": np.float64}
INT64 = (-(2**63), 2**63 - 1)
USER_TABLE, ITEM_TABLE = "user_features.parquet", "item_features.parquet"
# The onnxruntime-optimised graph export saves beside ``<name>.onnx`` as ``<name>.optimized.onnx``
# (in a run's ``serving/`` artifacts: ``model.optimized.onnx``); it names the digest of the graph
# it was made from (``META.OPTIMIZED_FROM``), and a service uses it only when that matches.
OPTIMIZED_SUFFIX = ".optimized.onnx"
OPTIMIZED_GRAPH = "model" + OPTIMIZED_SUFFIX
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # where runs and models are, unless told


def resolve_tracking_uri(given: str | None = None) -> str:
    """The MLflow store: ``given``, else ``MLFLOW_TRACKING_URI``, else the SQLite default (the
    one rule the pipelines and the service share)."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3");
    ``ValueError`` otherwise. The one reading of a registry reference (the service,
    ``predict`` and ``fit --warm_start``)."""
    rest = uri.removeprefix("models:/") if uri.startswith("models:/") else ""
    name, at, alias = rest.partition("@")
    version = None
    if not at:
        name, _, version = rest.partition("/")
    parts = (name, alias) if at else (name, version)
    if not all(parts) or "/" in "".join(parts) or not (at or version.isdigit()):
        raise ValueError(f"'{uri}' is neither models:/<name>@<alias> nor models:/<name>/<version>")
    return name, alias or None, version


def optimized_path(graph: Path) -> Path:
    """Where the optimised graph of ``graph`` is saved: ``m.onnx`` -> ``m.optimized.onnx``."""
    return graph.with_name(graph.name.removesuffix(".onnx") + OPTIMIZED_SUFFIX)


def graph_digest(graph: Path) -> str:
    """The SHA-256 of a graph file: what ties an optimised graph to its source."""
    return hashlib.sha256(graph.read_bytes()).hexdigest()


class META:
    """Metadata keys of an exported model (``onnx`` ``metadata_props``)."""

    TASKS = "ranker.tasks"  # JSON list of task names, the order of the output's columns
    INPUTS = "ranker.inputs"  # JSON list of RawInput dicts
    USER_KEY = "ranker.user_key"
    ITEM_KEY = "ranker.item_key"
    NULL_INT = "ranker.null_int"
    NULL_STRING = "ranker.null_string"
    MODEL = "ranker.model"
    DATASET = "ranker.dataset"
    OPTIMIZED_FROM = "ranker.optimized_from"  # an optimised graph: its source's graph_digest
    QUANTIZED = "ranker.quantized"  # "int8" when the matmuls are dynamically quantised
    ARMS = "ranker.arms"  # an uplift model: JSON list of its arms, control first


# Inside the exported graph, the feature part hands the network its inputs in two parts: per
# candidate ("cat", "num", N rows) and per request (REQUEST_CAT, REQUEST_NUM and every sequence,
# R rows: 1 for one request, N for rows of as many), with REQUEST_INDEX [N] the request row of
# each candidate. The network computes what reads only the request R times, not N.
REQUEST_CAT, REQUEST_NUM, REQUEST_INDEX = "request:cat", "request:num", "request:index"


@dataclass(frozen=True)
class RequestLayout:
    """Which of a model's ``cat`` / ``num`` columns (``InputSpec`` order) belong to the request
    (user / context features) rather than the candidate (item features)."""

    cat_request: tuple[bool, ...]
    num_request: tuple[bool, ...]

    @classmethod
    def of(cls, cat_names: Sequence[str], num_names: Sequence[str], sides: Mapping[str, str]):
        """From the features' ``side`` (``sides``: feature name -> user | item | context)."""
        return cls(
            tuple(sides[n] != "item" for n in cat_names),
            tuple(sides[n] != "item" for n in num_names),
        )

    @property
    def cat_candidate_columns(self) -> list[int]:
        return [i for i, r in enumerate(self.cat_request) if not r]

    @property
    def cat_request_columns(self) -> list[int]:
        return [i for i, r in enumerate(self.cat_request) if r]

    @property
    def num_candidate_columns(self) -> list[int]:
        return [i for i, r in enumerate(self.num_request) if not r]

    @property
    def num_request_columns(self) -> list[int]:
        return [i for i, r in enumerate(self.num_request) if r]


@dataclass(frozen=True)
class RawInput:
    """One graph input: a raw column of the log (or of a request)."""

    name: str  # the column
    side: str  # user | item | context
    dtype: str  # int64 | string | float64 (of a sequence: of its elements)
    length: int = 0  # a sequence's length (its most recent values); 0 = one value a row

    @property
    def per_candidate(self) -> bool:
        return self.side == "item"

    @property
    def is_sequence(self) -> bool:
        return self.length > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_input(series: pl.Series, dtype: str, length: int = 0) -> np.ndarray:
    """A raw column as the graph takes it: typed, missing values as the markers (integers that
    do not parse count as missing, as in training); a list column ``[rows, length]``."""
    if length:
        values, counts = flatten_recent(series, length)
        return right_aligned(as_input(values, dtype), counts, length, MISSING[dtype])
    if dtype == "int64":
        numeric = series.dtype.is_integer() or series.dtype == pl.Boolean
        return series.cast(pl.Int64, strict=numeric).fill_null(NULL_INT).to_numpy()
    if dtype == "string":
        return series.cast(pl.String).fill_null(NULL_STRING).to_numpy().astype(object)
    return series.cast(pl.Float64).fill_null(float("nan")).to_numpy()


def flatten_recent(lists: pl.Series, length: int) -> tuple[pl.Series, np.ndarray]:
    """The most recent ``length`` values of each list (a null list is empty), flattened, and
    how many each row kept."""
    kept = lists.list.tail(length)
    counts = kept.list.len().fill_null(0).to_numpy().astype(np.int64)
    arrow = kept.to_arrow()
    if isinstance(arrow, pa.ChunkedArray):
        arrow = arrow.combine_chunks()
    return pl.Series(arrow.flatten()), counts


def missing(shape: int | tuple[int, ...], dtype: str) -> np.ndarray:
    """An array of the column type's missing marker (``np.full`` would turn the string marker
    ``"\x00"`` into ``""`` on its way through a numpy string)."""
    out = np.empty(shape, dtype=NUMPY_TYPE[dtype])
    out.fill(MISSING[dtype])
    return out


def right_aligned(values: np.ndarray, counts: np.ndarray, length: int, fill: Any) -> np.ndarray:
    """Flattened rows (``counts`` values each) as ``[rows, length]``, each row's values last."""
    out = np.empty((len(counts), length), dtype=values.dtype)
    out.fill(fill)  # np.full would pass "\x00" through a numpy string, which drops it
    rows = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    columns = length - counts[rows] + (np.arange(len(values)) - starts[rows])
    out[rows, columns] = values
    return out


def parse_id(value: Any, dtype: str) -> Any:
    """A client's id as the key column's type. A string that is not an integer, or an integer
    beyond int64, cannot be in an integer vocabulary: it is missing (the unknown bucket)."""
    if dtype != "int64":
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
            return NULL_INT
        value = int(text)
    if isinstance(value, float):
        value = int(value) if value.is_integer() else NULL_INT
    return value if INT64[0] < value <= INT64[1] else NULL_INT


FusionKind = Literal["sum", "product"]  # how ``Fusion`` combines (the CLIs' choices too)
FUSIONS: tuple[str, ...] = get_args(FusionKind)


@dataclass(frozen=True)
class Fusion:
    """How task probabilities become one ranking score, for ``ranker predict`` and
    ``ranker serve`` alike: ``sum`` = sum_t w_t p_t, ``product`` = prod_t p_t ** w_t (computed
    as exp(sum_t w_t log p_t)).

    The rule for tasks: with no weights, every task weighs 1; with weights, exactly the tasks
    named count and every other task weighs 0 (left out of the sum; ``p ** 0 = 1`` in the
    product). Naming a task the model lacks is an error.
    """

    kind: FusionKind = "sum"
    weights: Mapping[str, float] = field(default_factory=dict)  # task -> weight

    def __post_init__(self) -> None:
        if self.kind not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got '{self.kind}'")
        bad = sorted(t for t, w in self.weights.items() if not np.isfinite(w))
        if bad:
            raise ValueError(f"fusion weights must be finite numbers: {bad}")

    def vector(self, tasks: Sequence[str]) -> np.ndarray:
        """The weights ``[T]`` in ``tasks`` order; ``ValueError`` naming unknown tasks."""
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise ValueError(f"fusion weights name tasks the model lacks: {unknown} ({tasks})")
        if not self.weights:
            return np.ones(len(tasks))
        return np.array([float(self.weights.get(t, 0.0)) for t in tasks])

    def __call__(self, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``[N, T]`` probabilities and ``vector``'s weights -> ``[N]`` scores (float64)."""
        p = probs.astype(np.float64)
        if self.kind == "product":
            return np.exp(np.log(np.clip(p, 1e-12, 1.0)) @ weights)
        return p @ weights
