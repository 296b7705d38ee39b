"""What ``ranker export`` does to a checked graph for the service: the onnxruntime-optimised
graph saved beside it, and the optional dynamic INT8 quantisation.

* **Saved optimisation.** onnxruntime rewrites a graph at every session start (constant
  folding, fusions such as ``FusedMatMul``, ``QuickGelu``). Export runs those rewrites once, at
  the ``EXTENDED`` level (hardware-independent: the ``ALL`` level adds layout transforms tied
  to the exporting CPU, which the service still applies at start-up), and saves the result as
  ``<name>.optimized.onnx``, stamped with the digest of its source. The service loads it when
  the stamp matches (``serving.model.Scorer``).
* **INT8** (``--quantize int8``). ``onnxruntime.quantization.quantize_dynamic`` stores the
  weights of every matmul with a constant right-hand side (the experts, gates and towers) as
  int8, and quantises activations on the fly. It is accepted only if no task's AUC on
  held-out rows (the test split, then validation) moves by more than the tolerance.
  ``--quantize auto`` keeps it only if it is also faster on the exporting machine (timed on a
  request of ``REQUEST_ROWS`` candidates, both graphs taking turns): dynamic INT8 gains where
  the CPU has fast integer dot products (VNNI, AMX) and can lose where it has not.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from features.contract import META, graph_digest, optimized_path
from ranker.metrics import auc


def save_optimized(graph: Path) -> Path:
    """Writes and returns ``<graph>.optimized.onnx``, stamped with ``graph``'s digest."""
    target = optimized_path(graph)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(target))
    helper.set_model_props(
        optimized,
        {
            **{p.key: p.value for p in optimized.metadata_props},
            META.OPTIMIZED_FROM: graph_digest(graph),
        },
    )
    onnx.save_model(optimized, str(target))
    return target


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with int8 weights in every matmul whose right-hand side is constant."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's advice on pre-processing, for this call only
    try:
        with tempfile.TemporaryDirectory() as work:
            source, target = Path(work) / "float.onnx", Path(work) / "int8.onnx"
            onnx.save_model(model, str(source))
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
            quantized = onnx.load(str(target))
    finally:  # the process's other warnings (the service's) keep their level
        root.setLevel(level)
    props = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(quantized, {**props, META.QUANTIZED: "int8"})
    return quantized


@dataclass
class AucChange:
    """Per task: held-out rows with a label, AUC of the float and of the INT8 graph."""

    rows: dict[str, int]
    float_auc: dict[str, float]
    int8_auc: dict[str, float]

    @property
    def change(self) -> dict[str, float]:
        return {t: self.int8_auc[t] - self.float_auc[t] for t in self.float_auc}

    def worst(self) -> tuple[str, float]:
        task = max(self.change, key=lambda t: abs(self.change[t]))
        return task, self.change[task]


def auc_change(
    float_probs: np.ndarray, int8_probs: np.ndarray, labels: np.ndarray, tasks: list[str]
) -> AucChange:
    """AUC of both graphs' probabilities ``[N, T]`` against ``labels`` ``[N, T]`` (NaN = not
    observed), per task with both classes present."""
    rows, before, after = {}, {}, {}
    for t, task in enumerate(tasks):
        seen = ~np.isnan(labels[:, t])
        y = labels[seen, t]
        if y.size == 0 or y.min() == y.max():
            continue
        rows[task] = int(seen.sum())
        before[task] = auc(float_probs[seen, t], y)
        after[task] = auc(int8_probs[seen, t], y)
    return AucChange(rows, before, after)


# ``--quantize auto`` times both graphs on a request of this many candidates (the service's
# typical request in the benchmarks) on the exporting machine.
REQUEST_ROWS = 500
# INT8 is kept only if at least this much faster: a gain inside timing noise is not worth an
# AUC change.
MARGIN = 0.05


def median_ms(
    sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], repeats: int = 30
) -> dict[str, float]:
    """Median milliseconds of one ``run`` of each session on ``feeds``, after a warm-up, the
    sessions taking turns (a machine's drift falls on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feeds)
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(values)) for name, values in times.items()}


@dataclass
class GraphChoice:
    """``--quantize auto``: the faster of the float and the INT8 graph on this machine, INT8
    only where its AUC change is within the tolerance and it is ``MARGIN`` faster."""

    rows: int  # candidates per timed request
    float_ms: float
    int8_ms: float | None  # None: INT8 refused (not timed)
    refused: str | None

    @property
    def int8(self) -> bool:
        return self.int8_ms is not None and self.int8_ms < self.float_ms * (1 - MARGIN)

    def __str__(self) -> str:
        if self.int8_ms is None:
            return f"float32 kept: {self.refused}"
        kept = "INT8" if self.int8 else "float32"
        return (
            f"{kept} kept: {self.rows} candidates in {self.int8_ms:.2f} ms (INT8) against "
            f"{self.float_ms:.2f} ms (float32), median on this machine"
        )


def choose_graph(
    float_session: ort.InferenceSession,
    int8_session: ort.InferenceSession | None,
    refused: str | None,
    feeds: dict[str, np.ndarray],
) -> GraphChoice:
    """Times the float graph and the INT8 one (``None``: ``refused``, not timed) on ``feeds``."""
    sessions = {"float": float_session, "int8": int8_session}
    ms = median_ms({k: v for k, v in sessions.items() if v is not None}, feeds)
    return GraphChoice(len(next(iter(feeds.values()))), ms["float"], ms.get("int8"), refused)
