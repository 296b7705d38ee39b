"""The per-task report printed after ``ranker fit`` (and logged to the run as ``report.md``).

Beside the model's validation / test metrics it shows, where the log carries true
probabilities (synthetic logs: ``truth`` columns), the metrics of those probabilities: the
best AUC / GAUC any model could reach on that split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console

from features.datamodule import RankerDataModule
from features.synth_uplift import true_probabilities
from pipelines.render import Table, wide_console
from ranker.metrics import task_metrics
from ranker.module import RankerModule
from ranker.uplift_metrics import uplift_metrics

COLUMNS = (
    ("val", "auc", "val AUC"),
    ("oracle_val", "auc", "best AUC"),
    ("val", "gauc", "val GAUC"),
    ("oracle_val", "gauc", "best GAUC"),
    ("val", "logloss", "val logloss"),
    ("val", "calibration", "val calib"),
    ("test", "auc", "test AUC"),
    ("test", "gauc", "test GAUC"),
)


@dataclass
class FitReport:
    model: str
    dataset: str
    tasks: list[str]
    positive_rates: dict[str, float]
    metrics: dict[str, dict[str, float]]  # stage -> "<metric>/<task>" -> value
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def value(self, stage: str, metric: str, task: str) -> float:
        return self.metrics.get(stage, {}).get(f"{metric}/{task}", math.nan)

    def columns(self) -> list[tuple[str, str, str]]:
        return [c for c in COLUMNS if c[0] in self.metrics]

    def rows(self) -> list[list[str]]:
        rows = []
        for task in [*self.tasks, "mean"]:
            rate = self.positive_rates.get(task)
            cells = [task, "" if rate is None else f"{rate:.4f}"]
            cells += [_fmt(self.value(stage, metric, task)) for stage, metric, _ in self.columns()]
            rows.append(cells)
        return rows

    def headers(self) -> list[str]:
        return ["task", "pos. rate", *(title for _, _, title in self.columns())]

    def table(self) -> Table:
        table = Table(self.headers())
        for row in self.rows():
            table.add(row)
        return table

    def markdown(self) -> str:
        lines = [f"# {self.model} on {self.dataset}", "", self.table().markdown(), "", *self.notes]
        return "\n".join(lines) + "\n"

    def oracle_metrics(self) -> dict[str, float]:
        """The best-achievable metrics, named for MLflow (``oracle/val/auc/click``)."""
        return {
            f"oracle/{split}/{k}": v
            for split in ("val", "test")
            for k, v in self.metrics.get(f"oracle_{split}", {}).items()
            if not math.isnan(v) and not k.startswith("count/")
        }


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def oracle_metrics(datamodule: RankerDataModule, split: str) -> dict[str, float] | None:
    """Metrics of the true probabilities on a split, or None if the log carries none."""
    tasks = datamodule.config.tasks
    truth = [t.truth for t in tasks if t.truth]
    if not truth:
        return None
    # Only the labels, users and truths: the whole split is in memory (exact GAUC needs it).
    columns = dict.fromkeys([datamodule.config.user_key, *(t.label for t in tasks), *truth])
    scan = datamodule.source.scan(split, extra=tuple(truth)).select(list(columns))
    frame = scan.collect(engine="streaming")
    labels, users = datamodule.state.targets(frame)
    probs = np.column_stack(
        [
            frame[t.truth].cast(pl.Float64).to_numpy() if t.truth else np.full(len(frame), np.nan)
            for t in tasks
        ]
    )
    return task_metrics(probs, labels, users, [t.name for t in tasks])


@dataclass
class UpliftTruth:
    """A split of generated uplift data as ``uplift_metrics`` takes it, with every row's true
    probabilities ``[N, A, T]``."""

    probabilities: np.ndarray
    labels: np.ndarray
    treatment: np.ndarray
    propensity: np.ndarray | None

    def metrics(self, arms: list[str], tasks: list[str]) -> dict[str, float]:
        """The true effects' ``uplift_metrics``: the best achievable Qini, AUUC..."""
        args = (self.labels, self.treatment, arms, tasks, self.propensity)
        return uplift_metrics(self.probabilities, *args)

    def aligned(self, labels: np.ndarray, treatment: np.ndarray) -> bool:
        """Whether rows scored elsewhere are these rows in this order (labels and arms)."""
        return (
            labels.shape == self.labels.shape
            and np.array_equal(labels, self.labels, equal_nan=True)
            and np.array_equal(treatment, self.treatment)
        )


def uplift_truth(datamodule: RankerDataModule, split: str) -> UpliftTruth | None:
    """The split's true effects, or None unless the log carries every arm's true probability
    (``p_<task>_<arm>``, as ``ranker synth --treatments`` writes them)."""
    treatment, c = datamodule.state.treatment, datamodule.config
    if treatment is None:
        return None
    tasks = [t.name for t in c.tasks]
    truth = [f"p_{t}_{a}" for a in treatment.arms for t in tasks]
    if any(column not in datamodule.source.schema for column in truth):
        return None
    frame = datamodule.source.scan(split, extra=tuple(truth)).collect()  # in the log's order
    labels, _ = datamodule.state.targets(frame)
    return UpliftTruth(
        true_probabilities(frame, treatment.arms, tasks),
        labels,
        frame.select(treatment.index_expr()).to_series().to_numpy(),
        frame[treatment.propensity].to_numpy() if treatment.propensity else None,
    )


def fit_report(
    module: RankerModule,
    datamodule: RankerDataModule,
    calibrated: dict[str, float] | None = None,
) -> FitReport:
    metrics = dict(module.last_metrics)
    oracle = oracle_metrics(datamodule, "val")
    if oracle is not None:
        metrics["oracle_val"] = oracle
        metrics["oracle_test"] = oracle_metrics(datamodule, "test")
    rates = (
        {t: metrics["val"].get(f"positive_rate/{t}", math.nan) for t in module.task_names}
        if "val" in metrics
        else {}
    )
    notes = []
    if module.selected:
        epoch = ""
        trainer = module._trainer
        callback = trainer.checkpoint_callback if trainer is not None else None
        if callback is not None and callback.best_model_path:
            epoch = f" (best: {Path(callback.best_model_path).name})"
        notes.append(f"checkpoint chosen on val mean {module.selected.upper()}{epoch}")
    if calibrated:
        before, after = (
            {m: calibrated[f"calibration/val/{m}_{when}/mean"] for m in ("ece", "calibration")}
            for when in ("before", "after")
        )
        notes.append(
            f"calibration ({module.hparams.calibration}, fitted on val): mean ECE "
            f"{before['ece']:.4f} -> {after['ece']:.4f}, mean calibration "
            f"{before['calibration']:.3f} -> {after['calibration']:.3f} (the val and test rows "
            "above are calibrated)"
        )
    if oracle is not None:
        notes.append(
            "best AUC / GAUC: the true probabilities of the synthetic log, on the "
            "same validation rows: the ceiling any model can reach."
        )
    if datamodule.config.note:
        notes.append(datamodule.config.note)
    return FitReport(
        model=type(module.network).__name__,
        dataset=datamodule.config.name,
        tasks=module.task_names,
        positive_rates=rates,
        metrics=metrics,
        notes=notes,
    )


def print_report(report: FitReport, console: Console | None = None) -> None:
    console = console or wide_console()
    title = f"{report.model} on {report.dataset}"
    if report.run_id:
        title += f"  (MLflow run {report.run_id})"
    console.print(report.table().rich(title=title))
    for note in report.notes:
        console.print(note, style="dim")


def print_synth_summary(frame: pl.DataFrame, path: Path) -> None:
    """Rates per task and, with the static truth (``p_static_<task>``), the oracle gap a
    history can close: the AUC / GAUC of the true probabilities against those of the user's
    interest averaged over the log's days (the best a static user embedding can do)."""
    from features.synth import TASKS

    names = [t.name for t in TASKS]
    labels = frame.select(names).to_numpy().astype(np.float32)
    users = frame["user_id"].to_numpy()
    best = task_metrics(frame.select(f"p_{n}" for n in names).to_numpy(), labels, users, names)
    static = None
    if f"p_static_{names[0]}" in frame.columns:
        probs = frame.select(f"p_static_{n}" for n in names).to_numpy()
        static = task_metrics(probs, labels, users, names)
    headers = ["task", "group", "target rate", "rate", "mean p", "best AUC"]
    table = Table(headers + (["static AUC", "gap AUC", "gap GAUC"] if static else []))
    for task in [*TASKS, None]:
        name = task.name if task else "mean"
        cells = [name, task.group, f"{task.rate:.4f}"] if task else [name, "", ""]
        cells += (
            [f"{frame[name].mean():.4f}", f"{frame[f'p_{name}'].mean():.4f}"] if task else ["", ""]
        )
        cells.append(_fmt(best[f"auc/{name}"]))
        if static:
            cells.append(_fmt(static[f"auc/{name}"]))
            cells += [_fmt(best[f"{m}/{name}"] - static[f"{m}/{name}"]) for m in ("auc", "gauc")]
        table.add(cells)
    wide_console().print(table.rich(title=f"synthetic log: {frame.height:,} rows -> {path}"))
    if static:
        print(
            "oracle gap: the true probabilities against the same with each user's interest "
            "averaged over the log's days (what a history can add to a static user embedding)"
        )
