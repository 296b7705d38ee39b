"""The FeatureState's transform as an ONNX graph, so an exported model takes raw values.

``FeatureState.transform`` (polars) and this graph are the same function: raw column values in,
the model's ``cat`` int64 ``[N, F_cat]``, ``num`` float32 ``[N, F_num]`` and per sequence
``sequence:<name>`` int64 ``[N, L]`` out. The inputs follow ``features.contract``:

* One graph input per raw column, named after the column, 1-D (a sequence: ``[rows, L]``, the
  most recent ids right-aligned, padded with the missing marker). Item columns have ``N`` rows
  (the candidates); user and context columns have 1 row (one request) or ``N`` (offline batch
  scoring); the graph broadcasts them to ``N``.
* Categorical columns: int64 for integer vocabularies, string otherwise; ``ai.onnx.ml``
  ``LabelEncoder`` maps each value to its vocabulary index, anything else to 0 (unknown).
  A missing value is sent as ``NULL_INT`` / ``NULL_STRING``, which no vocabulary holds. A
  sequence's ids go through its ``vocabulary_of`` feature's encoder (padding -> 0, masked).
* Numeric columns: float64 (the transform is computed in float64, as polars does, then cast to
  float32); NaN or +-inf = missing. ``log1p`` is ``log(1 + max(x, 0))``; ``standardize`` /
  ``log1p`` then ``(x - mean) / std`` with missing -> 0; ``quantile_bucket`` is the number of
  boundaries ``<= x`` plus 1, missing -> 0.

The column layout is written to the model's metadata (``ranker.inputs``) for the service.
"""

from __future__ import annotations

import numpy as np
import onnx
import polars as pl
from onnx import TensorProto, helper, numpy_helper

from features.config import FeatureSpec
from features.contract import (
    HASH_INCREMENT,
    HASH_MULTIPLIER,
    HASH_PRIME,
    NULL_INT,
    RawInput,
    as_input,
)
from features.state import CategoricalState, FeatureState, NumericState

OPSET = 18
ML_OPSET = 3


def _dtype(state: CategoricalState) -> str:
    return "int64" if state.dtype == "int" else "string"


def raw_inputs(state: FeatureState, features: tuple[FeatureSpec, ...]) -> list[RawInput]:
    """The graph's inputs in feature order, one per distinct column, sequences last."""
    side = {f.name: f.side for f in features}
    vocabulary = {c.name: c for c in state.categorical}
    inputs: dict[str, RawInput] = {}
    wanted = [
        *(RawInput(c.column, side[c.name], _dtype(c)) for c in state.categorical),
        *(RawInput(n.column, side[n.name], "float64") for n in state.numeric),
        *(
            RawInput(s.column, side[s.name], _dtype(vocabulary[s.vocabulary]), s.max_len)
            for s in state.sequences
        ),
    ]
    for raw in wanted:
        found = inputs.setdefault(raw.name, raw)
        if (found.dtype, found.length) != (raw.dtype, raw.length):
            raise ValueError(f"column {raw.name!r} is used both as {found} and {raw}")
    return list(inputs.values())


def sequence_output(name: str) -> str:
    """The preprocessing graph's output (and the network's input) for a sequence feature."""
    return f"sequence:{name}"


def _tensor_type(dtype: str) -> int:
    return {
        "int64": TensorProto.INT64,
        "string": TensorProto.STRING,
        "float64": TensorProto.DOUBLE,
    }[dtype]


class _Graph:
    """A small helper to add nodes and constants with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1  # prefixed: names stay apart from the model graph's when merged
        return f"features/{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: object) -> str:
        out = self.name(hint)
        domain = "ai.onnx.ml" if op_type == "LabelEncoder" else ""
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out


def _lookup(g: _Graph, x: str, state: CategoricalState) -> str:
    """Vocabulary index of each value (1..V), 0 for anything else."""
    if state.hash_buckets:
        return _hashed(g, x, state.hash_buckets)
    indices = list(range(1, len(state.values) + 1))
    if state.dtype == "int":
        keys = {"keys_int64s": [int(v) for v in state.values]}
    else:
        keys = {"keys_strings": [str(v) for v in state.values]}
    if not state.values:  # LabelEncoder needs keys; every value is unknown
        zero = numpy_helper.from_array(np.array([0], dtype=np.int64))
        return g.op("ConstantOfShape", [g.op("Shape", [x], "shape")], "unknown", value=zero)
    return g.op(
        "LabelEncoder", [x], f"{state.name}_index", values_int64s=indices, default_int64=0, **keys
    )


def _hashed(g: _Graph, x: str, buckets: int) -> str:
    """``features.state.hashed_index`` as ops: 1 + ((x mod P) * A + C) mod P mod N, the
    missing marker -> 0 (ONNX's integer Mod takes the divisor's sign, as polars' does)."""

    def const(value: int, hint: str) -> str:
        return g.const(np.array(value, dtype=np.int64), hint)

    prime = const(HASH_PRIME, "hash_prime")
    r = g.op("Mod", [x, prime], "hash_r")
    mixed = g.op("Mul", [r, const(HASH_MULTIPLIER, "hash_a")], "hash_m")
    mixed = g.op("Add", [mixed, const(HASH_INCREMENT, "hash_c")], "hash_mixed")
    bucket = g.op("Mod", [g.op("Mod", [mixed, prime], "hash_p"), const(buckets, "hash_n")], "b")
    index = g.op("Add", [bucket, const(1, "one")], "hash_index")
    missing = g.op("Equal", [x, const(NULL_INT, "null_int")], "hash_missing")
    return g.op("Where", [missing, const(0, "zero"), index], "hashed")


def _missing(g: _Graph, x: str) -> str:
    return g.op("Or", [g.op("IsNaN", [x], "nan"), g.op("IsInf", [x], "inf")], "missing")


def _bucket(g: _Graph, x: str, state: NumericState) -> str:
    """Quantile bucket: #boundaries <= x, plus 1; 0 when missing."""
    column = g.op("Unsqueeze", [x, g.const(np.array([1], dtype=np.int64), "axis1")], "col")
    bounds = g.const(np.asarray(state.boundaries, dtype=np.float64)[None, :], "boundaries")
    below = g.op(
        "Cast", [g.op("LessOrEqual", [bounds, column], "le")], "le64", to=TensorProto.INT64
    )
    count = g.op(
        "ReduceSum", [below, g.const(np.array([1], dtype=np.int64), "axis1")], "n", keepdims=0
    )
    index = g.op("Add", [count, g.const(np.int64(1), "one")], "bucket")
    return g.op("Where", [_missing(g, x), g.const(np.int64(0), "zero"), index], "bucket_or_0")


def _dense(g: _Graph, x: str, state: NumericState) -> str:
    # Missing is decided on the raw value, as polars does (non-finite -> null first): the
    # transform then only sees finite numbers (Max(NaN, 0) is 0 on some ORT kernels).
    missing = _missing(g, x)
    value = g.op("Where", [missing, g.const(np.float64(0), "zero"), x], "finite")
    if state.transform == "log1p":
        clipped = g.op("Max", [value, g.const(np.float64(0), "zero")], "clip")
        value = g.op("Log", [g.op("Add", [clipped, g.const(np.float64(1), "one")], "p1")], "log1p")
    centred = g.op("Sub", [value, g.const(np.float64(state.mean), "mean")], "centred")
    scaled = g.op("Div", [centred, g.const(np.float64(state.std), "std")], "scaled")
    filled = g.op("Where", [missing, g.const(np.float64(0), "zero"), scaled], "filled")
    return g.op("Cast", [filled], "f32", to=TensorProto.FLOAT)


def preprocessing_model(state: FeatureState, features: tuple[FeatureSpec, ...]) -> onnx.ModelProto:
    """Raw columns -> ``cat`` [N, F_cat] int64 and ``num`` [N, F_num] float32."""
    inputs = raw_inputs(state, features)
    g = _Graph()
    # N: the most rows of any input (the candidates); 1-row user / context inputs broadcast.
    shapes = [g.op("Shape", [i.name], "shape", start=0, end=1) for i in inputs]
    rows = g.op("ReduceMax", [g.op("Concat", shapes, "shapes", axis=0)], "rows", keepdims=1)
    axis1 = g.const(np.array([1], dtype=np.int64), "axis1")

    def as_column(x: str) -> str:  # [1 or N] -> [N, 1]
        return g.op("Unsqueeze", [g.op("Expand", [x, rows], "expanded"), axis1], "column")

    vocabulary = {c.name: c for c in state.categorical}
    for seq in state.sequences:  # [1 or N, L] raw ids -> [N, L] indices
        shape = g.op("Concat", [rows, g.const(np.array([seq.max_len], np.int64), "L")], "s", axis=0)
        ids = _lookup(g, seq.column, vocabulary[seq.vocabulary])
        g.nodes.append(helper.make_node("Expand", [ids, shape], [sequence_output(seq.name)]))
    cat_columns = [as_column(_lookup(g, s.column, s)) for s in state.categorical]
    cat_columns += [as_column(_bucket(g, s.column, s)) for s in state.bucketized]
    num_columns = [as_column(_dense(g, s.column, s)) for s in state.dense]
    g.nodes.append(helper.make_node("Concat", cat_columns, ["cat"], axis=1))
    if num_columns:
        g.nodes.append(helper.make_node("Concat", num_columns, ["num"], axis=1))
    else:  # no dense features: an [N, 0] tensor
        shape = g.op("Concat", [rows, g.const(np.array([0], dtype=np.int64), "zero")], "s", axis=0)
        g.nodes.append(
            helper.make_node(
                "ConstantOfShape",
                [shape],
                ["num"],
                value=numpy_helper.from_array(np.array([0], dtype=np.float32)),
            )
        )
    dims = {True: "candidates", False: "request_rows"}
    graph = helper.make_graph(
        g.nodes,
        "ranker_features",
        [
            helper.make_tensor_value_info(
                i.name,
                _tensor_type(i.dtype),
                [dims[i.per_candidate], *([i.length] if i.is_sequence else [])],
            )
            for i in inputs
        ],
        [
            *(
                helper.make_tensor_value_info(
                    sequence_output(seq.name), TensorProto.INT64, ["candidates", seq.max_len]
                )
                for seq in state.sequences
            ),
            helper.make_tensor_value_info(
                "cat", TensorProto.INT64, ["candidates", len(cat_columns)]
            ),
            helper.make_tensor_value_info(
                "num", TensorProto.FLOAT, ["candidates", len(num_columns)]
            ),
        ],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
    )
    onnx.checker.check_model(model)
    return model


def raw_feeds(frame: pl.DataFrame, inputs: list[RawInput]) -> dict[str, np.ndarray]:
    """A frame of raw rows as graph inputs."""
    return {i.name: as_input(frame[i.name], i.dtype, i.length) for i in inputs}
