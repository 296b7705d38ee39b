"""``ranker evaluate``: score a trained model on a split and write its evaluation report.

    ranker evaluate --run <MLflow run id | checkpoint path> [--split test]

The checkpoint is self-contained: the model's weights and hyper-parameters, the FeatureState it
was trained with, and the dataset config and log it read. Evaluation streams the split once:
each batch's scores feed the per-task metrics and its expert outputs and gate weights feed the
expert-health statistics (``ranker.diagnostics``). The report (HTML with embedded plots,
markdown, ``evaluation.json``) is written under ``--out`` and, when the model has an MLflow run
in the tracking store, logged to that run (``evaluation/<split>/``) with its metrics
(``eval/<split>/<metric>/<task>``).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features.config import SplitName
from features.contract import ARM_OUTPUT, LOGITS
from features.datamodule import RankerDataModule
from pipelines.checkpoints import RunError, find_run, load, locate
from pipelines.evaluation import EVALUATION_FILE, RELIABILITY_BINS, SAMPLE_ROWS, Evaluation
from pipelines.render import (
    comparison_html,
    comparison_markdown,
    evaluation_html,
    evaluation_markdown,
    print_comparison,
    print_evaluation,
)
from pipelines.report import UpliftTruth, oracle_metrics, uplift_truth
from pipelines.tracking import resolve_tracking_uri
from ranker.diagnostics import ExpertStats, HealthLimits, health
from ranker.metrics import metrics_by_history, reliability, task_metrics
from ranker.module import RankerModule
from ranker.scoring import Scored, arrays_of_graph, probabilities, score
from ranker.uplift_metrics import effect_errors, qini_curves, uplift_metrics

# -- scoring ------------------------------------------------------------------------------------


def score_split(
    module: RankerModule, data: RankerDataModule, split: SplitName
) -> tuple[Scored, ExpertStats]:
    """One pass over the split: the network's outputs (raw logits), labels, users and the
    length of the first sequence feature's history, and the expert statistics."""
    stats = ExpertStats(sample_rows=SAMPLE_ROWS)
    dataset = data.dataset(split)
    history = history_feature(data)
    scored = score(
        module.network, dataset, rows=dataset.rows, internals=stats.update, history=history
    )
    if not scored.size:
        raise RunError(f"the {split} split of {data.config.path} has no rows")
    return scored, stats


def history_feature(data: RankerDataModule) -> str | None:
    """The sequence the report buckets rows by: the first the model reads, if any."""
    sequences = data.state.sequences
    return sequences[0].name if sequences else None


def reliability_curves(
    probs: np.ndarray, labels: np.ndarray, tasks: list[str]
) -> dict[str, dict[str, list[float]]]:
    curves = {}
    for t, task in enumerate(tasks):
        observed = ~np.isnan(labels[:, t])
        rows, pred, rate = reliability(probs[observed, t], labels[observed, t], RELIABILITY_BINS)
        curves[task] = {"rows": rows.tolist(), "pred": pred.tolist(), "rate": rate.tolist()}
    return curves


def uplift_evaluation(
    module: RankerModule, scored: Scored, truth: UpliftTruth | None
) -> dict[str, Any]:
    """The ``Evaluation`` fields of uplift data: the model's arms, Qini, AUUC and uplift at k
    per task and arm (calibrated, as the graph scores), its Qini curves; on generated data
    (``truth``), the true effects' metrics and the model's errors against them (PEHE, effect
    correlation)."""
    arms, tasks = list(module.inputs.arms), module.task_names
    fields: dict[str, Any] = {"uplift_oracle": truth.metrics(arms, tasks) if truth else None}
    if not arms:
        return fields
    graph = arrays_of_graph(scored.outputs, module.calibrator)[ARM_OUTPUT]
    args = (scored.labels, scored.treatment, arms, tasks, scored.propensity)
    fields |= {"arms": arms, "uplift": uplift_metrics(graph, *args)}
    fields["qini_curves"] = qini_curves(graph, *args)
    if truth is not None and truth.aligned(scored.labels, scored.treatment):
        fields["uplift"] |= effect_errors(graph, truth.probabilities, arms, tasks)
    return fields


def evaluate(
    *,
    run: str,
    split: Literal["train", "val", "test"] = "test",
    dataset: str | None = None,
    log_path: str | None = None,
    out: Path | None = None,
    batch_size: int = 2048,
    tracking_uri: str | None = None,
    log: bool = True,
    quiet: bool = False,
) -> Evaluation:
    """Score a trained model on a split; write and log its evaluation report.

    Args:
        run: an MLflow run id, or the path of a checkpoint (``.ckpt``).
        split: the split to score.
        dataset: dataset config to read instead of the one the model was trained on.
        log_path: log to read instead of the dataset config's (or the training run's).
        out: report directory (default ``reports/<run or checkpoint>/<split>``).
        batch_size: rows scored per batch (2,048: the activations stay in cache; the
            measured speed-up over 16,384 is in ``benchmarks/RESULTS.md``).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        log: log the report and metrics to the model's MLflow run, when it has one.
        quiet: print nothing.
    """
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        located = locate(run, client, Path(tmp))
        module, data = load(located, client, Path(tmp), dataset, log_path, batch_size)
        seconds["load"] = time.perf_counter() - start

        tick = time.perf_counter()
        scored, stats = score_split(module, data, split)
        seconds["score"] = time.perf_counter() - tick

    tick = time.perf_counter()
    tasks = module.task_names
    logits, labels, users = scored.outputs[LOGITS], scored.labels, scored.users
    probs = probabilities(logits, module.calibrator)
    metrics = task_metrics(probs, labels, users, tasks)
    identity = bool((module.calibrator.scale == 1).all() and (module.calibrator.bias == 0).all())
    uncalibrated = None if identity else task_metrics(probabilities(logits), labels, users, tasks)
    history = history_feature(data)
    by_history = (
        metrics_by_history(probs, labels, users, scored.lengths, tasks) if history else None
    )
    curves = reliability_curves(probs, labels, tasks)
    seconds["metrics"] = time.perf_counter() - tick
    tick = time.perf_counter()
    oracle = oracle_metrics(data, split)
    uplift = uplift_evaluation(module, scored, uplift_truth(data, split))
    seconds["oracle"] = time.perf_counter() - tick

    rates = {t: metrics[f"positive_rate/{t}"] for t in tasks}
    limits = HealthLimits()
    report = health(stats, tasks, rates, limits)
    evaluation = Evaluation(
        label=run,
        run_id=located.run_id,
        checkpoint=located.origin,
        model=type(module.network).__name__,
        params=sum(p.numel() for p in module.network.parameters()),
        dataset=data.config.name,
        log_path=str(data.config.path),
        split=split,
        rows=len(probs),
        tasks=tasks,
        groups={t.name: t.group for t in module.tasks},
        metrics=metrics,
        oracle=oracle,
        reliability=curves,
        health=report.to_dict(),
        limits=asdict(limits),
        seconds=seconds,
        history=history,
        by_history=by_history,
        uncalibrated=uncalibrated,
        **uplift,
    )

    label = located.run_id or located.path.stem
    directory = out or Path("reports") / label / split
    seconds["total"] = time.perf_counter() - start  # to a scored, diagnosed split
    tick = time.perf_counter()
    write_evaluation(evaluation, directory, stats.samples)
    seconds["report"] = time.perf_counter() - tick
    (directory / EVALUATION_FILE).write_text(evaluation.to_json())  # with the report's time
    logged = log and located.run_id is not None
    if logged:
        log_evaluation(client, evaluation, directory)
    if not quiet:
        print_evaluation(evaluation, directory, logged)
    return evaluation


def write_evaluation(
    evaluation: Evaluation, directory: Path, samples: dict[str, np.ndarray] | None = None
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.html").write_text(evaluation_html(evaluation, samples or {}))
    (directory / "report.md").write_text(evaluation_markdown(evaluation))
    (directory / EVALUATION_FILE).write_text(evaluation.to_json())


def log_evaluation(client: MlflowClient, evaluation: Evaluation, directory: Path) -> None:
    """The report under ``evaluation/<split>/`` and the metrics as ``eval/<split>/...``."""
    now = int(time.time() * 1000)
    logged = {**evaluation.metrics, **(evaluation.uplift or {})}
    metrics = [
        Metric(f"eval/{evaluation.split}/{key}", float(value), now, 0)
        for key, value in logged.items()
        if not key.startswith("count/") and value is not None and math.isfinite(value)
    ]
    for begin in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(evaluation.run_id, metrics=metrics[begin : begin + 1000])
    client.log_artifacts(evaluation.run_id, str(directory), f"evaluation/{evaluation.split}")


def logged_evaluation(client: MlflowClient, run_id: str, split: str) -> Evaluation | None:
    """The evaluation an earlier ``ranker evaluate`` logged to the run, if any."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=f"evaluation/{split}/{EVALUATION_FILE}",
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
        except (MlflowException, OSError):
            return None
        return Evaluation.from_json(Path(path).read_text())


# -- comparing runs -----------------------------------------------------------------------------


def compare(
    runs: list[str],
    split: Literal["train", "val", "test"] = "test",
    out: Path | None = None,
    tracking_uri: str | None = None,
    quiet: bool = False,
    dataset: str | None = None,
) -> list[Evaluation]:
    """Side-by-side per-task metrics and expert-health flags of several runs.

    A run's evaluation that ``ranker evaluate`` logged for this split is reused; a run without
    one (or a checkpoint path) is evaluated first, which logs it. With ``dataset``, every run
    is scored on that dataset config's split instead (the same rows for all, e.g. a champion
    and its challenger on tomorrow's data), each with its own FeatureState; nothing is logged.
    """
    if len(runs) < 2:
        raise RunError(f"compare needs at least two runs, got {len(runs)}")
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    evaluations = []
    uri = client.tracking_uri
    for ref in runs:
        if dataset:
            evaluations.append(
                evaluate(
                    run=ref, split=split, dataset=dataset, tracking_uri=uri, log=False, quiet=True
                )
            )
            continue
        is_run = not Path(ref).exists() and find_run(client, ref) is not None
        earlier = logged_evaluation(client, ref, split) if is_run else None
        evaluations.append(earlier or evaluate(run=ref, split=split, tracking_uri=uri, quiet=True))
    base = evaluations[0]
    for e in evaluations[1:]:
        if e.tasks != base.tasks:
            raise RunError(
                f"runs trained on different tasks cannot be compared: {base.label} has "
                f"{base.tasks}, {e.label} has {e.tasks}"
            )
    notes = []
    if len({(e.log_path, e.rows) for e in evaluations}) > 1:
        notes.append(
            "The runs were scored on different data: "
            + "; ".join(f"{e.name}: {e.log_path} ({e.rows:,} rows)" for e in evaluations)
        )
    directory = out or Path("reports") / "compare" / "-".join(e.short_id for e in evaluations)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "comparison.html").write_text(comparison_html(evaluations, notes))
    (directory / "comparison.md").write_text(comparison_markdown(evaluations, notes))
    if not quiet:
        print_comparison(evaluations, directory)
    return evaluations
