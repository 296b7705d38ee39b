"""The FeatureState's transform as an ONNX graph, so an exported model takes raw values.

``FeatureState.transform`` (polars) and this graph are the same function: raw column values in,
the model's ``cat`` int64 ``[N, F_cat]``, ``num`` float32 ``[N, F_num]`` and per sequence
``sequence:<name>`` int64 ``[N, L]`` out, the request's columns held once per request (below).
The inputs follow ``features.contract``:

* One graph input per raw column, named after the column, 1-D (a sequence: ``[rows, L]``, the
  most recent ids right-aligned, padded with the missing marker). Item columns have ``N`` rows
  (the candidates); user and context columns have 1 row (one request) or ``N`` (offline batch
  scoring). The outputs keep them apart (``features.contract.RequestLayout``): the request's
  columns stay at their own row count, so the network computes their share once per request.
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
    REQUEST_CAT,
    REQUEST_INDEX,
    REQUEST_NUM,
    RawInput,
    RequestLayout,
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


def request_layout(state: FeatureState, features: tuple[FeatureSpec, ...]) -> RequestLayout:
    """Which of the model's ``cat`` / ``num`` columns are the request's (user / context)."""
    spec = state.input_spec(features)
    return RequestLayout.of(spec.cat_names, spec.num_names, {f.name: f.side for f in features})


def _stack(g: _Graph, columns: list[str], rows: str, dtype: np.dtype, out: str) -> None:
    """1-D columns -> ``out`` ``[rows, len(columns)]`` (an ``[rows, 0]`` tensor when none)."""
    axis1 = g.const(np.array([1], dtype=np.int64), "axis1")
    expanded = [
        g.op("Unsqueeze", [g.op("Expand", [x, rows], "expanded"), axis1], "column") for x in columns
    ]
    if expanded:
        g.nodes.append(helper.make_node("Concat", expanded, [out], axis=1))
        return
    shape = g.op("Concat", [rows, g.const(np.array([0], dtype=np.int64), "zero")], "s", axis=0)
    zero = numpy_helper.from_array(np.array([0], dtype=dtype))
    g.nodes.append(helper.make_node("ConstantOfShape", [shape], [out], value=zero))


def _most_rows(g: _Graph, inputs: list[RawInput]) -> str:
    """``[1]``: the most rows of ``inputs`` (1 when there are none)."""
    shapes = [g.op("Shape", [i.name], "shape", start=0, end=1) for i in inputs]
    shapes.append(g.const(np.array([1], dtype=np.int64), "one_row"))
    return g.op("ReduceMax", [g.op("Concat", shapes, "shapes", axis=0)], "rows", keepdims=1)


def preprocessing_model(state: FeatureState, features: tuple[FeatureSpec, ...]) -> onnx.ModelProto:
    """Raw columns -> the network's inputs, split per candidate and per request
    (``features.contract.RequestLayout``): ``cat`` / ``num`` ``[N, .]`` of the item features,
    ``request:cat`` / ``request:num`` ``[R, .]`` of the user / context ones and the sequences
    ``[R, L]``, and ``request:index`` ``[N]`` (each candidate's request row: R is 1, or N)."""
    inputs = raw_inputs(state, features)
    layout = request_layout(state, features)
    g = _Graph()
    # N: the most rows of any input (the candidates); R: of the request's inputs. Expanding
    # range(R) to N rows is the index, and fails unless R is 1 or N.
    rows = _most_rows(g, inputs)
    request_rows = _most_rows(g, [i for i in inputs if not i.per_candidate])
    scalar = g.op("Squeeze", [request_rows], "R")
    zero, one = g.const(np.int64(0), "zero"), g.const(np.int64(1), "one")
    request_range = g.op("Range", [zero, scalar, one], "request_range")
    g.nodes.append(helper.make_node("Expand", [request_range, rows], [REQUEST_INDEX]))

    vocabulary = {c.name: c for c in state.categorical}
    for seq in state.sequences:  # [1 or N, L] raw ids -> [R, L] indices
        length = g.const(np.array([seq.max_len], np.int64), "L")
        shape = g.op("Concat", [request_rows, length], "s", axis=0)
        ids = _lookup(g, seq.column, vocabulary[seq.vocabulary])
        g.nodes.append(helper.make_node("Expand", [ids, shape], [sequence_output(seq.name)]))
    cat = [_lookup(g, s.column, s) for s in state.categorical]
    cat += [_bucket(g, s.column, s) for s in state.bucketized]
    num = [_dense(g, s.column, s) for s in state.dense]
    for columns, on_request, dtype, names in (
        (cat, layout.cat_request, np.int64, ("cat", REQUEST_CAT)),
        (num, layout.num_request, np.float32, ("num", REQUEST_NUM)),
    ):
        mine = [c for c, r in zip(columns, on_request, strict=True) if not r]
        _stack(g, mine, rows, dtype, names[0])
        _stack(
            g,
            [c for c, r in zip(columns, on_request, strict=True) if r],
            request_rows,
            dtype,
            names[1],
        )

    dims = {True: "candidates", False: "request_rows"}
    width = {
        "cat": len(layout.cat_candidate_columns),
        "num": len(layout.num_candidate_columns),
        REQUEST_CAT: len(layout.cat_request_columns),
        REQUEST_NUM: len(layout.num_request_columns),
    }
    outputs = [
        *(
            helper.make_tensor_value_info(
                sequence_output(seq.name), TensorProto.INT64, ["request_rows", seq.max_len]
            )
            for seq in state.sequences
        ),
        *(
            helper.make_tensor_value_info(
                name,
                TensorProto.INT64 if "cat" in name else TensorProto.FLOAT,
                ["candidates" if name in ("cat", "num") else "request_rows", n],
            )
            for name, n in width.items()
        ),
        helper.make_tensor_value_info(REQUEST_INDEX, TensorProto.INT64, ["candidates"]),
    ]
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
        outputs,
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
