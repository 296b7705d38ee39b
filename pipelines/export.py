"""``ranker export`` / ``ranker promote``: a trained run as a registered, self-contained ONNX model.

    ranker export --run <run id | checkpoint> [--name ranker-synthetic]
    ranker promote --name ranker-synthetic --alias champion [--version 3]

The exported graph is the FeatureState's transform (``features.onnx_graph``: raw values in,
vocabulary lookup and numeric transforms inside) followed by the network and a sigmoid
(``torch.onnx.export``, dynamo), merged into one model: raw columns in, ``probabilities``
``[N, T]`` out. Before anything is logged, the model is scored on real rows of the log by
onnxruntime and by the torch model fed by the training transform; the largest difference of
probabilities must be within ``tolerance`` or the export fails. The model is then logged to the
run with MLflow's ONNX flavour (signature and input example) and registered as a new version.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import polars as pl
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from onnx import compose

from features.config import SPLITS, DatasetConfig
from features.contract import (
    ITEM_TABLE,
    META,
    NULL_INT,
    NULL_STRING,
    OPTIMIZED_GRAPH,
    OUTPUT,
    REQUEST_CAT,
    REQUEST_INDEX,
    REQUEST_NUM,
    USER_TABLE,
    RequestLayout,
    optimized_path,
)
from features.datamodule import RankerDataModule
from features.onnx_graph import (
    preprocessing_model,
    raw_feeds,
    raw_inputs,
    request_layout,
    sequence_output,
)
from features.state import FeatureState
from pipelines.checkpoints import RunError, load, locate
from pipelines.render import wide_console
from pipelines.serving_graph import AucChange, auc_change, quantize_int8, save_optimized
from pipelines.tracking import resolve_tracking_uri
from ranker.experts import ExpertPool
from ranker.layers import RequestSplit
from ranker.module import RankerModule

CHUNK = 16384
TIE_GAP = 1e-5  # logits closer than this: a top-k choice rounding may flip (`near_ties`)


class Probabilities(torch.nn.Module):
    """The network, its calibration and the sigmoid, the sequences as positional inputs: what
    a scorer wants."""

    def __init__(self, module: RankerModule) -> None:
        super().__init__()
        self.network, self.calibrator = module.network, module.calibrator
        self.names = [s.name for s in module.network.inputs.sequences]

    def forward(
        self, cat: torch.Tensor, num: torch.Tensor, *sequences: torch.Tensor
    ) -> torch.Tensor:
        logits = self.network(cat, num, dict(zip(self.names, sequences, strict=True)))
        return torch.sigmoid(self.calibrator(logits))


class SplitProbabilities(torch.nn.Module):
    """``Probabilities`` of the feature graph's outputs, split per candidate and per request
    (``features.contract.RequestLayout``): a network that takes a ``RequestSplit`` computes the
    request's share of its first layer once per request; any other gets its inputs joined back
    to one row per candidate."""

    def __init__(self, module: RankerModule, layout: RequestLayout) -> None:
        super().__init__()
        self.network, self.calibrator, self.layout = module.network, module.calibrator, layout
        self.names = [s.name for s in module.network.inputs.sequences]

    def forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        request_cat: torch.Tensor,
        request_num: torch.Tensor,
        index: torch.Tensor,
        *sequences: torch.Tensor,
    ) -> torch.Tensor:
        ids = dict(zip(self.names, sequences, strict=True))
        network, layout = self.network, self.layout
        if network.splits_request:
            x = network.embed_split(cat, num, request_cat, request_num, index, ids, layout)
            logits = network.head(x, None)
        else:
            cat = RequestSplit(
                cat, request_cat, index, layout.cat_candidate_columns, layout.cat_request_columns
            ).dense()
            num = RequestSplit(
                num, request_num, index, layout.num_candidate_columns, layout.num_request_columns
            ).dense()
            logits = network(cat, num, {k: v.index_select(0, index) for k, v in ids.items()})
        return torch.sigmoid(self.calibrator(logits))


def network_model(module: RankerModule, layout: RequestLayout) -> onnx.ModelProto:
    """The feature graph's outputs -> probabilities, exported with dynamic candidate and
    request row counts (traced with 4 candidates of 2 requests)."""
    spec = module.inputs
    rows, requests = 4, 2  # the dynamo exporter specialises 1; any size >= 2 stays symbolic

    def ids(columns: list[int], n: int) -> torch.Tensor:  # [n, len(columns)] valid ids
        cardinality = torch.tensor([spec.cardinalities[c] for c in columns], dtype=torch.long)
        return torch.arange(n).unsqueeze(1) % cardinality

    sequences = [
        ids([spec.cat_names.index(s.vocabulary)] * s.max_len, requests) for s in spec.sequences
    ]
    example = (
        ids(layout.cat_candidate_columns, rows),
        torch.zeros(rows, len(layout.num_candidate_columns)),
        ids(layout.cat_request_columns, requests),
        torch.zeros(requests, len(layout.num_request_columns)),
        torch.arange(rows) % requests,
        *sequences,
    )
    names = [sequence_output(s.name) for s in spec.sequences]
    inference = copy.deepcopy(module).eval()
    for pool in (m for m in inference.modules() if isinstance(m, ExpertPool)):
        pool.fold_norms()  # BatchNorm into the weights: one matmul per expert layer
    n, r = torch.export.Dim("candidates"), torch.export.Dim("request_rows")
    shapes: tuple = ({0: n}, {0: n}, {0: r}, {0: r}, {0: n})
    shapes += (tuple({0: r} for _ in sequences),) if sequences else ()
    # The exporter narrates each step on stdout and warns about optional packages; keep the
    # command's output to what the user asked for (errors still raise).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            SplitProbabilities(inference, layout),
            example,
            dynamo=True,
            input_names=["cat", "num", REQUEST_CAT, REQUEST_NUM, REQUEST_INDEX, *names],
            output_names=[OUTPUT],
            dynamic_shapes=shapes,
            opset_version=18,
            verbose=False,
        )
    return program.model_proto


def build(module: RankerModule, data: RankerDataModule) -> onnx.ModelProto:
    """The whole scorer: raw columns -> probabilities, with the layout in its metadata."""
    return scorer_graph(module, data.state, data.config)


def scorer_graph(
    module: RankerModule, state: FeatureState, config: DatasetConfig
) -> onnx.ModelProto:
    """``build`` from the model's FeatureState and dataset config (no log read)."""
    features = preprocessing_model(state, config.features)
    network = network_model(module, request_layout(state, config.features))
    features.ir_version = network.ir_version
    sequences = [sequence_output(s.name) for s in state.sequences]
    names = ["cat", "num", REQUEST_CAT, REQUEST_NUM, REQUEST_INDEX, *sequences]
    io_map = [(n, n) for n in names]
    model = compose.merge_models(features, network, io_map=io_map)
    opsets = {o.domain: o.version for o in model.opset_import}  # the merge lists "" twice
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    inputs = raw_inputs(state, config.features)
    onnx.helper.set_model_props(
        model,
        {
            META.TASKS: json.dumps([t.name for t in module.tasks]),
            META.INPUTS: json.dumps([i.to_dict() for i in inputs]),
            META.USER_KEY: config.user_key,
            META.ITEM_KEY: config.item_key,
            META.NULL_INT: str(NULL_INT),
            META.NULL_STRING: NULL_STRING,
            META.MODEL: type(module.network).__name__,
            META.DATASET: config.name,
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


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


def torch_probabilities(
    module: RankerModule, state: FeatureState, frame: pl.DataFrame
) -> np.ndarray:
    """Calibrated probabilities ``[N, T]`` of raw rows, by torch (the parity reference)."""
    batch = state.transform(frame)
    wrapped = Probabilities(module).eval()
    out = []
    with torch.no_grad():
        for begin in range(0, len(batch), CHUNK):
            rows = slice(begin, begin + CHUNK)
            part = batch.map(lambda a, rows=rows: torch.from_numpy(a[rows]))
            sequences = [part.sequences[name] for name in wrapped.names]
            out.append(wrapped(part.cat, part.num, *sequences).numpy())
    return np.concatenate(out)


def near_ties(module: RankerModule, state: FeatureState, frame: pl.DataFrame) -> np.ndarray:
    """Rows ``[N]`` that a top-k gate routes on a near-tie: its k-th and (k+1)-th logits
    within ``TIE_GAP``. Rounding of another runtime may pick the other expert there, a jump in
    the output that is not an export error (none without top-k routing)."""
    ties = np.zeros(frame.height, dtype=bool)
    layers = getattr(module.network, "layers", ())
    if not any(getattr(layer, "routing", None) and layer.routing.top_k for layer in layers):
        return ties
    batch = state.transform(frame)
    with torch.no_grad():
        for begin in range(0, len(batch), CHUNK):
            rows = slice(begin, begin + CHUNK)
            part = batch.map(lambda a, rows=rows: torch.from_numpy(a[rows]))
            _, internals = module.network.eval().forward_with_internals(
                part.cat, part.num, part.sequences
            )
            for gap in internals.margins.values():  # none where top_k >= the experts
                ties[rows] |= (gap < TIE_GAP).numpy()
    return ties


def onnx_probabilities(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    rows = len(next(iter(feeds.values())))
    return np.concatenate(
        [
            session.run([OUTPUT], {k: v[begin : begin + CHUNK] for k, v in feeds.items()})[0]
            for begin in range(0, rows, CHUNK)
        ]
    )


def feature_snapshots(data: RankerDataModule) -> dict[str, pl.DataFrame]:
    """Per user and per item, the latest non-missing value of each of its side's columns in
    the whole log: the tables the service fills requests from. A derived history is the one
    a request made after the log would see (``latest_histories``)."""
    c = data.config
    inputs = [i for i in raw_inputs(data.state, c.features) if i.name not in data.source.derived]
    extra = [s.column for s in c.sequences if not s.derived]
    for spec in c.sequences:
        if spec.derived:
            extra += [spec.timestamp, spec.from_label, c.feature(spec.vocabulary_of).column]
    log = pl.concat(
        [data.source.scan(split, tuple(extra), sequences=False) for split in SPLITS],
        how="vertical_relaxed",
    )
    tables = {}
    for side, key, file in (("user", c.user_key, USER_TABLE), ("item", c.item_key, ITEM_TABLE)):
        columns = [i.name for i in inputs if i.side == side and i.name != key]
        ordered = log.sort(c.time_column, maintain_order=True) if c.time_column else log
        latest = (
            ordered.select([key, *columns])
            .group_by(key, maintain_order=True)
            .agg([pl.col(name).drop_nulls().last() for name in columns])
        )
        if side == "user":
            for history in latest_histories(data, log):
                latest = latest.join(history, on=key, how="full", coalesce=True)
        tables[file] = latest.sort(key)
    frames = pl.collect_all(list(tables.values()), engine="streaming")
    return dict(zip(tables, frames, strict=True))


def latest_histories(data: RankerDataModule, log: pl.LazyFrame) -> list[pl.LazyFrame]:
    """Per user, each derived sequence as it stands after the whole log: the values at the
    user's last ``max_len`` positives, most recent last."""
    c, out = data.config, []
    for spec in (s for s in c.sequences if s.derived):
        value = c.feature(spec.vocabulary_of).column
        out.append(
            log.filter(
                (pl.col(spec.from_label).cast(pl.Float64) == 1)
                & pl.col(c.user_key).is_not_null()
                & pl.col(spec.timestamp).is_not_null()
                & ~pl.col(spec.timestamp).to_physical().cast(pl.Float64).is_nan()
            )
            .select(c.user_key, spec.timestamp, value)
            .sort(spec.timestamp, maintain_order=True)
            .group_by(c.user_key, maintain_order=True)
            .agg(pl.col(value).tail(spec.max_len).alias(spec.column))
        )
    return out


@dataclass
class Parity:
    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    ties: int  # rows left out: routed on a top-k near-tie (``near_ties``)


def cpu_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def graph_feeds(data: RankerDataModule, frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Raw rows of ``data``'s log as the exported graph's inputs."""
    return raw_feeds(frame, raw_inputs(data.state, data.config.features))


def check_parity(
    session: ort.InferenceSession,
    module: RankerModule,
    data: RankerDataModule,
    rows: int,
    tolerance: float,
) -> Parity:
    frame = parity_rows(data, rows)
    expected = torch_probabilities(module, data.state, frame)
    got = onnx_probabilities(session, graph_feeds(data, frame))
    ties = near_ties(module, data.state, frame)
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))[~ties]
    parity = Parity(len(diff), float(diff.max()), float(diff.mean()), int(ties.sum()))
    if not parity.max_abs_diff <= tolerance:  # NaN fails too
        raise RunError(
            f"ONNX parity failed on {parity.rows:,} rows of {data.config.path}: max |difference| "
            f"of probabilities {parity.max_abs_diff:.3g} > {tolerance:g}"
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
    diff = np.abs(onnx_probabilities(reloaded, feeds) - onnx_probabilities(session, feeds))
    diff = diff[~near_ties(module, data.state, frame)]
    if not diff.max() <= tolerance:
        raise RunError(f"the optimised graph {optimized} differs by {diff.max():.3g}")


def quantize_checked(
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    data: RankerDataModule,
    rows: int,
    tolerance: float,
) -> tuple[onnx.ModelProto, AucChange]:
    """The INT8 graph, if no task's AUC on held-out rows moves by more than ``tolerance``."""
    frame = parity_rows(data, rows, ("test", "val"))
    feeds = graph_feeds(data, frame)
    labels = data.state.transform(frame).labels
    quantized = quantize_int8(model)
    tasks = [t.name for t in data.tasks]
    change = auc_change(
        onnx_probabilities(session, feeds),
        onnx_probabilities(cpu_session(quantized), feeds),
        labels,
        tasks,
    )
    if not change.float_auc:
        raise RunError(
            f"no held-out rows of {data.config.path} with both labels: cannot check INT8"
        )
    task, delta = change.worst()
    if not abs(delta) <= tolerance:
        raise RunError(
            f"INT8 refused: the AUC of {task} moved by {delta:+.4f} on {change.rows[task]:,} "
            f"held-out rows of {data.config.path} (tolerance {tolerance:g}); export in float32 "
            "(no --quantize) or allow more with --quantize_tolerance"
        )
    return quantized, change


@dataclass
class Exported:
    path: Path
    parity: Parity  # of the float graph against torch
    int8: AucChange | None  # with --quantize int8: the AUC change it was accepted with
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
    quantize: Literal["none", "int8"] = "none",
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
        tolerance: the largest allowed |difference| of probabilities.
        quantize: ``int8``: dynamic INT8 quantisation of the matmuls (smaller, faster on CPU),
            accepted only if no task's AUC on held-out rows moves by more than
            ``quantize_tolerance``.
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
    model = build(module, data)
    session = cpu_session(model)  # one session for the parity check and the signature
    checked = check_parity(session, module, data, parity, tolerance)
    change = None
    if quantize == "int8":
        model, change = quantize_checked(model, session, data, quantize_rows, quantize_tolerance)
        session = cpu_session(model)
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
            client, located.run_id, model, session, data, name, checked, change
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
        located.run_id,
        name if register else None,
        version,
        model_uri,
        time.perf_counter() - start,
    )
    if not quiet:
        print_export(exported)
    return exported


def log_and_register(
    client: MlflowClient,
    run_id: str,
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    data: RankerDataModule,
    name: str,
    parity: Parity,
    change: AucChange | None = None,
) -> tuple[str, str]:
    """Log with the ONNX flavour (signature, input example) and register a new version."""
    inputs = raw_inputs(data.state, data.config.features)
    example_frame = parity_rows(data, 3)
    example = raw_feeds(example_frame, inputs)
    signature = infer_signature(example, session.run([OUTPUT], example)[0])
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                model,
                name="onnx",
                signature=signature,
                input_example=example,
                registered_model_name=name,
                onnx_execution_providers=["CPUExecutionProvider"],
            )
            mlflow.log_metrics(
                {
                    "export/parity_rows": parity.rows,
                    "export/parity_max_abs_diff": parity.max_abs_diff,
                    "export/parity_mean_abs_diff": parity.mean_abs_diff,
                    "export/parity_topk_ties": parity.ties,
                    **{
                        f"export/int8_auc_change/{task}": delta
                        for task, delta in (change.change.items() if change else ())
                    },
                }
            )
    except MlflowException as err:
        raise RunError(f"could not log or register the model: {err.message}") from None
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "run_id", run_id)
    return version, f"models:/{name}/{version}"


def print_export(e: Exported) -> None:
    console = wide_console()
    console.print(
        f"parity: {e.parity.rows:,} real rows, max |difference| {e.parity.max_abs_diff:.2e}, "
        f"mean {e.parity.mean_abs_diff:.2e}"
        + (f" ({e.parity.ties:,} rows on a top-k near-tie left out)" if e.parity.ties else "")
    )
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


def promote(
    *,
    name: str,
    alias: str = "champion",
    version: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Point an alias (``models:/<name>@<alias>``) at a registered version.

    Args:
        name: registered model name.
        alias: the alias to move.
        version: the version (default: the latest).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
    """
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        raise RunError(f"cannot read registered model '{name}': {err.message}") from None
    if not versions:
        raise RunError(f"no registered model '{name}' in {client.tracking_uri}")
    known = sorted(int(v.version) for v in versions)
    chosen = version or str(known[-1])
    if not chosen.isdigit() or int(chosen) not in known:
        raise RunError(f"'{name}' has no version {chosen} (versions: {known})")
    client.set_registered_model_alias(name, alias, chosen)
    wide_console().print(f"models:/{name}@{alias} -> version {chosen}")
    return chosen
