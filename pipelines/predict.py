"""``ranker predict``: batch scoring of a behaviour log to Parquet, for offline jobs.

    ranker predict --model <run id | checkpoint> --log_path <parquet file, directory or hive
                   dataset> --out <directory> [--backend onnx|torch] [--fusion '{click: 1}']

The log is read one row group at a time (side tables joined, derived histories from the
pre-pass over this log, as in training), scored, and written as one Parquet part file per row
group: memory stays flat in the log size. Exactly one output row per input row, in the log's
order: the user key, the item key, the time column, one probability column per task
(``p_<task>``, calibrated), the columns of any other output the model names (``output_columns``)
and, with ``--fusion``, the fused ``score`` (``features.contract.Fusion``: the service's rule).
An uplift model scores customers for every arm (no arm column is read): ``p_<arm>_<task>`` of
each arm, control included, and ``uplift_<arm>_<task>`` of each treatment against control.
No label is read. Scored by the ONNX graph ``ranker export`` builds (the service's), or by torch
(``--backend torch``). Each call is an MLflow run naming the model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import polars as pl
from mlflow.tracking import MlflowClient
from rich.progress import Progress

from features.config import ConfigError, DatasetConfig, SplitSpec
from features.contract import ARM_OUTPUT, FUSIONS, META, OUTPUT, Fusion, FusionKind, RawInput
from features.onnx_graph import raw_feeds, raw_inputs
from features.source import LogSource
from pipelines.checkpoints import Loaded, RunError, load_model, locate
from pipelines.export.graph import scorer_graph
from pipelines.export.parity import cpu_session, onnx_outputs, torch_outputs
from pipelines.tracking import resolve_tracking_uri
from serving.model import ModelError
from serving.registry import parse, resolve_version

PART = "part-{:05d}.parquet"
EXPERIMENT = "ranker-predict"


@dataclass
class Predicted:
    out: Path
    rows: int
    files: int
    seconds: float
    run_id: str | None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def scoring_source(config: DatasetConfig, log_path: str) -> LogSource:
    """The log to score, read as training reads it, without labels or splits. Uplift data
    scores customers for every arm: neither the arm column nor an item key is read (the
    uplift configs name the arm column as their item key)."""
    unlabelled = dataclasses.replace(
        config.with_path(log_path), tasks=(), split=SplitSpec(train_end=None)
    )
    if config.treatment is not None:
        unlabelled = dataclasses.replace(unlabelled, treatment=None, item_key=config.user_key)
    return LogSource(unlabelled)


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{out} holds an earlier result; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class Model:
    """What scores: the exported graph (a session) or torch (``loaded``), its tasks and raw
    inputs, the dataset config that reads the log, and what the MLflow run records."""

    tasks: list[str]
    inputs: list[RawInput]
    config: DatasetConfig
    session: ort.InferenceSession | None
    loaded: Loaded | None
    tags: dict[str, str]
    arms: list[str]  # an uplift model's arms, control first ([] for a ranker)

    def __call__(self, frame: pl.DataFrame) -> dict[str, np.ndarray]:
        """The graph's named outputs of raw rows (calibrated ``probabilities [N, T]``...)."""
        if self.session is not None:
            return onnx_outputs(self.session, raw_feeds(frame, self.inputs))
        assert self.loaded is not None
        return torch_outputs(self.loaded.module, self.loaded.state, frame)


def from_run(ref: str, client: MlflowClient, dataset: str | None, backend: str) -> Model:
    """A run id or checkpoint: the graph is built from it (or torch scores)."""
    with tempfile.TemporaryDirectory() as tmp:
        located = locate(ref, client, Path(tmp))
        loaded = load_model(located, client, Path(tmp), dataset)
    config = DatasetConfig.from_yaml(loaded.dataset)
    session = None
    if backend == "onnx":
        session = cpu_session(scorer_graph(loaded.module, loaded.state, config))
    tags = {"model": located.label, **({"model.run_id": located.run_id} if located.run_id else {})}
    treatment = loaded.state.treatment
    return Model(
        [t.name for t in loaded.module.tasks],
        raw_inputs(loaded.state, config.features),
        config,
        session,
        loaded,
        tags,
        list(treatment.arms) if treatment else [],
    )


def from_registry(ref: str, client: MlflowClient, dataset: str | None, backend: str) -> Model:
    """``models:/name@alias`` or ``models:/name/version``: the registered graph (the one the
    service runs), the dataset config of the run that exported it."""
    import mlflow

    name, _, _ = parse(ref)
    try:
        version = resolve_version(ref, client.tracking_uri)
    except ModelError as err:
        raise RunError(str(err)) from None
    run_id = client.get_model_version(name, version).run_id
    model = from_run(run_id, client, dataset, "torch")
    model.tags.update({"model": ref, "model.name": name, "model.version": version})
    if backend == "onnx":
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}",
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
            files = sorted(Path(local).rglob("*.onnx"))
            if not files:
                raise RunError(f"models:/{name}/{version} holds no .onnx file")
            model.session = cpu_session(onnx.load(str(files[0])))
        model.loaded = None
    return model


def from_file(path: Path, dataset: str | None, backend: str) -> Model:
    """An exported ``.onnx`` file: its tasks and inputs from its metadata; the log is read
    with ``dataset`` (the file carries no dataset config)."""
    if backend != "onnx":
        raise RunError(f"{path} is an ONNX file: it scores with --backend onnx only")
    if dataset is None:
        raise RunError(f"{path} carries no dataset config: pass --dataset to read the log")
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    if META.TASKS not in meta or META.INPUTS not in meta:
        raise RunError(f"{path} is not a model ranker export wrote (no {META.TASKS} metadata)")
    inputs = [RawInput(**i) for i in json.loads(meta[META.INPUTS])]
    tags = {"model": str(path)}
    config = DatasetConfig.from_yaml(dataset)
    arms = json.loads(meta.get(META.ARMS, "[]"))
    tasks = json.loads(meta[META.TASKS])
    return Model(tasks, inputs, config, cpu_session(graph), None, tags, arms)


def resolve(ref: str, client: MlflowClient, dataset: str | None, backend: str) -> Model:
    if ref.startswith("models:/"):
        return from_registry(ref, client, dataset, backend)
    if ref.endswith(".onnx"):
        return from_file(Path(ref), dataset, backend)
    return from_run(ref, client, dataset, backend)


def output_columns(
    outputs: dict[str, np.ndarray], tasks: list[str], arms: list[str] = ()
) -> dict[str, np.ndarray]:
    """One column per task of each output: ``p_<task>`` of ``probabilities``; ``<name>_<task>``
    of another ``[N, T]`` output; of an ``[N, K, T]`` one, ``<name>_<arm>_<task>`` (an uplift
    model's: ``p_<arm>_<task>`` of ``arm_probabilities`` over every arm, ``uplift_<arm>_<task>``
    over the treatments) or ``<name>_<i>_<task>``; ``<name>`` of an ``[N]`` one, ``<name>_<j>``
    of any other shape."""
    columns = {}
    for name, values in outputs.items():
        prefix = "p" if name in (OUTPUT, ARM_OUTPUT) else name
        if values.ndim == 1:
            columns[name] = values
        elif values.shape[-1] == len(tasks) and values.ndim in (2, 3):
            rows = values.reshape(len(values), -1, len(tasks))
            middle = [""] if values.ndim == 2 else [f"_{a}" for a in labels(rows.shape[1], arms)]
            for i, part in enumerate(middle):
                for t, task in enumerate(tasks):
                    columns[f"{prefix}{part}_{task}"] = rows[:, i, t]
        else:
            flat = values.reshape(len(values), -1)
            columns.update({f"{name}_{j}": flat[:, j] for j in range(flat.shape[1])})
    return columns


def labels(k: int, arms: list[str]) -> list[str] | range:
    """Names of an output's K rows: every arm, the treatments (all but control), else 0..K-1."""
    if k == len(arms):
        return arms
    return arms[1:] if arms and k == len(arms) - 1 else range(k)


def output_frame(
    frame: pl.DataFrame,
    outputs: dict[str, np.ndarray],
    keys: list[str],
    tasks: list[str],
    fusion: Fusion | None,
    arms: list[str] = (),
) -> pl.DataFrame:
    columns = output_columns(outputs, tasks, arms)
    taken = sorted(set(columns) & {*keys, "score"})
    if taken:
        raise RunError(f"the model's outputs would overwrite the columns {taken}: rename them")
    out = frame.select(keys).with_columns(pl.Series(k, v) for k, v in columns.items())
    if fusion is not None:
        score = fusion(outputs[OUTPUT], fusion.vector(tasks)).astype(np.float32)
        out = out.with_columns(pl.Series("score", score))
    return out


def predict(
    *,
    model: str,
    log_path: str,
    out: Path,
    backend: Literal["onnx", "torch"] = "onnx",
    fusion: dict[str, float] | None = None,
    fusion_kind: FusionKind | None = None,
    overwrite: bool = False,
    dataset: str | None = None,
    tracking_uri: str | None = None,
    log: bool = True,
    quiet: bool = False,
) -> Predicted:
    """Score every row of a log with a trained model; write the probabilities as Parquet.

    Args:
        model: an MLflow run id, a checkpoint (``.ckpt``), a registered model
            (``models:/<name>@<alias>`` or ``models:/<name>/<version>``: its ONNX graph, the one
            the service runs) or an exported ``.onnx`` file (with ``--dataset``).
        log_path: the log to score (a Parquet file, a directory, a hive-partitioned dataset).
        out: output directory of the part files.
        backend: ``onnx`` (the exported graph the service runs) or ``torch``.
        fusion: task weights of a fused ``score`` column: only the tasks named count (the
            others weigh 0); ``{}`` weighs every task 1 (the rule of ``ranker serve
            --weights``).
        fusion_kind: ``sum`` (sum_t w_t p_t, the default) or ``product`` (prod_t p_t ** w_t) of
            the fused ``score``; either alone writes the score with every task weighing 1.
        overwrite: replace an earlier result in ``out``.
        dataset: dataset config that reads the log, instead of the model's (required for
            a ``.onnx`` file).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        log: record the call as an MLflow run (experiment ``ranker-predict``).
        quiet: no progress bar and no summary.
    """
    start = time.perf_counter()
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    scorer = resolve(model, client, dataset, backend)
    config, tasks = scorer.config, scorer.tasks
    rule = None
    if fusion is not None or fusion_kind is not None:
        try:
            rule = Fusion(fusion_kind or FUSIONS[0], fusion or {})
            rule.vector(tasks)
        except ValueError as err:
            raise ConfigError(f"--fusion: {err}") from None
    source = scoring_source(config, log_path)
    prepare_out(out, overwrite)
    named = (source.config.user_key, source.config.item_key, config.time_column)
    keys = list(dict.fromkeys(k for k in named if k))  # a log without time has no time column
    columns = tuple(dict.fromkeys([*keys, *source.columns_needed()]))
    rows = 0
    with Progress(disable=quiet, transient=True) as progress:
        bar = progress.add_task("scoring", total=sum(p.rows for p in source.pieces))
        for i, piece in enumerate(source.pieces):
            frame = source.join_side_tables(source.read_piece_columns(piece, columns))
            scored = output_frame(frame, scorer(frame), keys, tasks, rule, scorer.arms)
            scored.write_parquet(out / PART.format(i))
            rows += frame.height
            progress.update(bar, advance=piece.rows)
    seconds = time.perf_counter() - start
    run_id = None
    if log:
        params = {"log_path": log_path, "out": str(out), "backend": backend}
        run_id = record(client, scorer.tags, params, rows, seconds)
    predicted = Predicted(out, rows, len(source.pieces), seconds, run_id)
    if not quiet:
        print(
            f"scored {rows:,} rows of {log_path} with {scorer.tags['model']} ({backend}) in "
            f"{seconds:.1f} s ({predicted.rows_per_second:,.0f} rows/s): {out}"
        )
    return predicted


def record(
    client: MlflowClient,
    tags: dict[str, str],
    params: dict[str, str],
    rows: int,
    seconds: float,
) -> str:
    """The call as an MLflow run of the experiment ``ranker-predict``, naming the model."""
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment, tags={"ranker.command": "predict", **tags})
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.log_metric(run_id, "rows", rows)
    client.log_metric(run_id, "seconds", seconds)
    client.log_metric(run_id, "rows_per_second", rows / seconds if seconds else 0.0)
    client.set_terminated(run_id)
    return run_id
