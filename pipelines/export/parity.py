"""Export's checks: the graph scores real rows of the log as torch does (every named output),
the saved optimised graph as the checked one, and the INT8 graph within an AUC tolerance.

The torch reference is ``ranker.scoring.score`` with the model's calibrator (the graph's
outputs, by torch), fed by the training transform; onnxruntime is fed the raw columns. Rows
that a top-k gate routes on a near-tie are left out and counted (``near_ties``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import polars as pl

from features.config import SPLITS
from features.contract import OUTPUT
from features.datamodule import RankerDataModule, frame_batches
from features.onnx_graph import raw_feeds, raw_inputs
from features.state import FeatureState
from pipelines.checkpoints import RunError
from pipelines.export.optimize import AucChange, auc_change, quantize_int8
from ranker.experts import Internals
from ranker.module import RankerModule
from ranker.scoring import score

CHUNK = 16384
TIE_GAP = 1e-5  # logits closer than this: a top-k choice rounding may flip (`near_ties`)


def cpu_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def parity_rows(
    data: RankerDataModule, rows: int, splits: tuple[str, ...] = tuple(reversed(SPLITS))
) -> pl.DataFrame:
    """Up to ``rows`` real rows: the test split first, then validation, then training (or the
    ``splits`` given, in that order)."""
    parts, missing = [], rows
    for split in splits:
        if missing <= 0:
            break
        part = data.source.scan(split).head(missing).collect(engine="streaming")
        parts.append(part)
        missing -= part.height
    return pl.concat(parts, how="vertical_relaxed")


def graph_feeds(data: RankerDataModule, frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Raw rows of ``data``'s log as the exported graph's inputs."""
    return raw_feeds(frame, raw_inputs(data.state, data.config.features))


def torch_outputs(
    module: RankerModule, state: FeatureState, frame: pl.DataFrame
) -> dict[str, np.ndarray]:
    """The graph's outputs of raw rows (``probabilities [N, T]``, calibrated, and any other
    named output), computed by torch: the parity reference. Uplift data is scored as the graph
    scores it, without the arm each row received (every arm's outputs; ``probabilities``
    control's)."""
    if state.treatment is not None:
        frame = frame.drop(state.treatment.column)
    batches = frame_batches(state, frame, CHUNK)
    return score(module.network, batches, rows=frame.height, calibrator=module.calibrator).outputs


def onnx_outputs(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every output of the graph on ``feeds``, by name, scored ``CHUNK`` rows at a time."""
    names = [o.name for o in session.get_outputs()]
    rows = len(next(iter(feeds.values())))
    parts = [
        session.run(names, {k: v[begin : begin + CHUNK] for k, v in feeds.items()})
        for begin in range(0, rows, CHUNK)
    ]
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


def near_ties(module: RankerModule, state: FeatureState, frame: pl.DataFrame) -> np.ndarray:
    """Rows ``[N]`` that a top-k gate routes on a near-tie: its k-th and (k+1)-th logits
    within ``TIE_GAP``. Rounding of another runtime may pick the other expert there, a jump in
    the output that is not an export error (none without top-k routing)."""
    ties = np.zeros(frame.height, dtype=bool)
    layers = getattr(module.network, "layers", ())
    if not any(getattr(layer, "routing", None) and layer.routing.top_k for layer in layers):
        return ties
    gaps: dict[str, list[np.ndarray]] = {}

    def keep(internals: Internals) -> None:  # none where top_k >= the experts
        for gate, gap in internals.margins.items():
            gaps.setdefault(gate, []).append(gap.cpu().numpy())

    score(module.network, frame_batches(state, frame, CHUNK), internals=keep)
    for parts in gaps.values():
        ties |= np.concatenate(parts) < TIE_GAP
    return ties


def largest_difference(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], keep: np.ndarray
) -> np.ndarray:
    """Per row (``keep`` rows only), the largest difference over every output and column,
    ``|got - expected| / max(1, |expected|)``: absolute for probabilities (and any value
    within [-1, 1]), relative for an output of larger scale (a norm, a count), whose float32
    rounding grows with it. A missing or extra output name is an error."""
    if set(got) != set(expected):
        raise RunError(f"the graph's outputs {sorted(got)} are not the model's {sorted(expected)}")
    diffs = []
    for name, reference in expected.items():
        want = reference.astype(np.float64)
        diff = np.abs(got[name].astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
        diffs.append(diff.reshape(len(keep), -1)[keep].max(axis=1, initial=0.0))
    return np.max(diffs, axis=0)


@dataclass
class Parity:
    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    ties: int  # rows left out: routed on a top-k near-tie (``near_ties``)
    outputs: tuple[str, ...] = (OUTPUT,)  # the graph outputs compared


def check_parity(
    session: ort.InferenceSession,
    module: RankerModule,
    data: RankerDataModule,
    rows: int,
    tolerance: float,
) -> Parity:
    """Every output of the graph against torch's on up to ``rows`` real rows: the largest
    |difference| must be within ``tolerance`` (``RunError`` naming the log otherwise)."""
    frame = parity_rows(data, rows)
    expected = torch_outputs(module, data.state, frame)
    got = onnx_outputs(session, graph_feeds(data, frame))
    ties = near_ties(module, data.state, frame)
    diff = largest_difference(got, expected, ~ties)
    parity = Parity(
        len(diff), float(diff.max()), float(diff.mean()), int(ties.sum()), tuple(expected)
    )
    if not parity.max_abs_diff <= tolerance:  # NaN fails too
        raise RunError(
            f"ONNX parity failed on {parity.rows:,} rows of {data.config.path}: max |difference| "
            f"of {', '.join(parity.outputs)} {parity.max_abs_diff:.3g} > {tolerance:g}"
        )
    return parity


def check_same(
    session: ort.InferenceSession,
    optimized: Path,
    frame: pl.DataFrame,
    module: RankerModule,
    data: RankerDataModule,
    tolerance: float,
) -> None:
    """The saved optimised graph scores ``frame`` as the checked graph does (rows routed on
    a top-k near-tie left out)."""
    feeds = graph_feeds(data, frame)
    reloaded = ort.InferenceSession(str(optimized), providers=["CPUExecutionProvider"])
    keep = ~near_ties(module, data.state, frame)
    diff = largest_difference(onnx_outputs(reloaded, feeds), onnx_outputs(session, feeds), keep)
    if not diff.max(initial=0.0) <= tolerance:
        raise RunError(f"the optimised graph {optimized} differs by {diff.max():.3g}")


def int8_candidate(
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    data: RankerDataModule,
    rows: int,
) -> tuple[onnx.ModelProto, ort.InferenceSession, AucChange]:
    """The INT8 graph, its session, and each task's AUC change on up to ``rows`` held-out
    rows (the test split, then validation) against the float graph ``session`` runs."""
    frame = parity_rows(data, rows, ("test", "val"))
    feeds = graph_feeds(data, frame)
    labels = data.state.transform(frame).labels
    quantized = quantize_int8(model)
    int8 = cpu_session(quantized)
    tasks = [t.name for t in data.tasks]
    change = auc_change(
        onnx_outputs(session, feeds)[OUTPUT], onnx_outputs(int8, feeds)[OUTPUT], labels, tasks
    )
    if not change.float_auc:
        raise RunError(
            f"no held-out rows of {data.config.path} with both labels: cannot check INT8"
        )
    return quantized, int8, change


def int8_refusal(change: AucChange, tolerance: float, data: RankerDataModule) -> str | None:
    """Why INT8 is refused (a task's AUC moved by more than ``tolerance``), or None."""
    task, delta = change.worst()
    if abs(delta) <= tolerance:
        return None
    return (
        f"INT8 refused: the AUC of {task} moved by {delta:+.4f} on {change.rows[task]:,} "
        f"held-out rows of {data.config.path} (tolerance {tolerance:g})"
    )
