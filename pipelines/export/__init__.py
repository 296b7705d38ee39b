"""``ranker export``: a trained run as a registered, self-contained ONNX model.

    ranker export --run <run id | checkpoint> [--name ranker-synthetic]

The job, by role: the graph (``graph``: raw columns in, one output per named model output,
``probabilities [N, T]`` for a ranker), its checks against torch on real rows (``parity``:
every output within ``tolerance`` or the export fails; the INT8 gate), the onnxruntime-optimised
copy (``optimize``), the feature tables the service fills requests from (``snapshots``), and the
MLflow model registry (``registry``: logged with the ONNX flavour, registered as a new version;
``ranker promote``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import onnxruntime as ort
import polars as pl
from mlflow.tracking import MlflowClient

from features.contract import ITEM_TABLE, OPTIMIZED_GRAPH, USER_TABLE, optimized_path
from features.datamodule import RankerDataModule
from pipelines.checkpoints import RunError, load, locate
from pipelines.export.graph import scorer_graph
from pipelines.export.optimize import (
    REQUEST_ROWS,
    AucChange,
    GraphChoice,
    choose_graph,
    save_optimized,
)
from pipelines.export.parity import (
    Parity,
    check_parity,
    check_same,
    cpu_session,
    graph_feeds,
    int8_candidate,
    int8_refusal,
    parity_rows,
)
from pipelines.export.registry import log_and_register
from pipelines.export.snapshots import feature_snapshots
from pipelines.render import wide_console
from pipelines.tracking import resolve_tracking_uri


@dataclass
class Exported:
    path: Path
    parity: Parity  # of the float graph against torch
    int8: AucChange | None  # the INT8 graph's AUC change, where it is the one exported
    choice: GraphChoice | None  # --quantize auto: the two graphs timed, the faster kept
    run_id: str | None
    name: str | None
    version: str | None
    model_uri: str | None
    seconds: float


def export(
    *,
    run: str,
    name: str | None = None,
    dataset: str | None = None,
    log_path: str | None = None,
    out: Path | None = None,
    parity: int = 20_000,
    tolerance: float = 1e-5,
    quantize: Literal["none", "int8", "auto"] = "none",
    quantize_tolerance: float = 0.001,
    quantize_rows: int = 100_000,
    register: bool = True,
    tracking_uri: str | None = None,
    quiet: bool = False,
) -> Exported:
    """Export a trained model to ONNX (raw features in, probabilities out), check parity on
    real rows, log it to its MLflow run and register it as a new version.

    Args:
        run: an MLflow run id, or the path of a checkpoint (``.ckpt``) with a run.
        name: registered model name (default ``ranker-<dataset>``).
        dataset: dataset config to use instead of the one the model was trained on.
        log_path: log to take parity rows from instead of the training log.
        out: where to write the ``.onnx`` file (default ``exports/<run>/model.onnx``).
        parity: real rows scored by both onnxruntime and torch (at least 10,000 when the log
            has them).
        tolerance: the largest allowed difference of any output, ``|d| / max(1, |x|)``
            (absolute for probabilities).
        quantize: ``int8``: dynamic INT8 quantisation of the matmuls (smaller, faster on CPU),
            accepted only if no task's AUC on held-out rows moves by more than
            ``quantize_tolerance``.
            ``auto``: INT8 only where it is within that tolerance and also faster on this
            machine (both graphs timed on a request of 500 candidates); float32 otherwise.
        quantize_tolerance: the largest allowed |AUC change| of a task under INT8.
        quantize_rows: held-out rows (test split, then validation) for the AUC check.
        register: log the model to the run and register it (else only write the file).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        quiet: print nothing.
    """
    start = time.perf_counter()
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    with tempfile.TemporaryDirectory() as tmp:
        located = locate(run, client, Path(tmp))
        module, data = load(located, client, Path(tmp), dataset, log_path)
    model = scorer_graph(module, data.state, data.config)
    session = cpu_session(model)  # one session for the parity check and the signature
    checked = check_parity(session, module, data, parity, tolerance)
    model, session, change, choice = with_quantize(
        model, session, data, quantize, quantize_rows, quantize_tolerance
    )
    path = out or Path("exports") / (located.run_id or located.path.stem) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    optimized = save_optimized(path)
    check_same(session, optimized, parity_rows(data, 2_000), module, data, tolerance)
    snapshots = feature_snapshots(data)
    for file, frame in snapshots.items():
        frame.write_parquet(path.parent / file)

    name = name or f"ranker-{data.config.name}"
    version = model_uri = None
    if register:
        if located.run_id is None:
            raise RunError(f"{run} has no MLflow run to log the model to; pass --register false")
        version, model_uri = log_and_register(
            client, located.run_id, model, session, data, name, checked, change, choice
        )
        for file in snapshots:
            client.log_artifact(located.run_id, str(path.parent / file), "serving")
        with tempfile.TemporaryDirectory() as tmp:  # under its contract name
            artifact = Path(tmp) / OPTIMIZED_GRAPH
            shutil.copyfile(optimized, artifact)
            client.log_artifact(located.run_id, str(artifact), "serving")
    exported = Exported(
        path,
        checked,
        change,
        choice,
        located.run_id,
        name if register else None,
        version,
        model_uri,
        time.perf_counter() - start,
    )
    if not quiet:
        print_export(exported)
    return exported


def with_quantize(
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    data: RankerDataModule,
    quantize: str,
    rows: int,
    tolerance: float,
) -> tuple[onnx.ModelProto, ort.InferenceSession, AucChange | None, GraphChoice | None]:
    """The graph to export under ``--quantize`` (its session), the INT8 AUC change where INT8
    is that graph, and ``auto``'s timings."""
    if quantize == "none":
        return model, session, None, None
    try:
        quantized, int8, change = int8_candidate(model, session, data, rows)
        refused = int8_refusal(change, tolerance, data)
    except RunError as err:  # no held-out labels to check INT8 against
        if quantize == "int8":
            raise
        refused = str(err)
    if refused and quantize == "int8":
        raise RunError(
            f"{refused}; export in float32 (no --quantize) or allow more with --quantize_tolerance"
        )
    choice = None
    if quantize == "auto":
        feeds = graph_feeds(data, parity_rows(data, REQUEST_ROWS))
        choice = choose_graph(session, None if refused else int8, refused, feeds)
        if not choice.int8:
            return model, session, None, choice
    return quantized, int8, change, choice


def print_export(e: Exported) -> None:
    console = wide_console()
    console.print(
        f"parity: {e.parity.rows:,} real rows, max |difference| {e.parity.max_abs_diff:.2e}, "
        f"mean {e.parity.mean_abs_diff:.2e}"
        + (f" ({e.parity.ties:,} rows on a top-k near-tie left out)" if e.parity.ties else "")
    )
    if e.choice is not None:
        console.print(f"--quantize auto: {e.choice}")
    if e.int8 is not None:
        changes = ", ".join(f"{t} {d:+.4f}" for t, d in e.int8.change.items())
        rows = max(e.int8.rows.values())
        console.print(f"INT8: AUC change on up to {rows:,} held-out rows: {changes}")
    console.print(f"ONNX model: {e.path} ({e.path.stat().st_size / 1e6:.1f} MB)")
    optimized = optimized_path(e.path)
    console.print(f"  optimised graph: {optimized} ({optimized.stat().st_size / 1e6:.1f} MB)")
    for file in (USER_TABLE, ITEM_TABLE):
        table = e.path.parent / file
        rows = pl.scan_parquet(table).select(pl.len()).collect().item()
        console.print(f"  feature table: {table} ({rows:,} rows)")
    if e.version:
        console.print(f"registered: {e.model_uri} (run {e.run_id})")
    console.print(f"exported in {e.seconds:.1f} s", style="dim")
