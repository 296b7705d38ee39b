"""The model zoo on one dataset with one budget: one table, every result an MLflow run.

    python benchmarks/zoo.py --log data/zoo2m --rows 2000000          # generated log
    python benchmarks/zoo.py --dataset configs/data/kuairand.yaml     # real data
    python benchmarks/zoo.py ... --models home home/no_norm home/flat  # the HoME ablations
    python benchmarks/zoo.py ... --table-only                          # re-print from MLflow
    python benchmarks/zoo.py ... --no-sequences     # the dataset's sequence features left out
    python benchmarks/zoo.py ... --variant pcgrad --fit-args "--model.loss_weighting pcgrad"

Each model is trained by ``ranker fit`` (a subprocess: the same command a user runs) with
``configs/model/<model>.yaml``, the same data, epochs, batch size and seeds, into the MLflow
experiment ``--experiment``. The table gives per-task test AUC and GAUC of each run's best
checkpoint (by validation mean GAUC), their means, the parameter count and the training time;
on a generated log, the row of the true probabilities; on KuaiRand, the data's bias. With
``--no-sequences`` the runs are named ``<model>-noseq`` and read a copy of the dataset config
without its sequence features; the table shows both variants of each model trained so far.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from mlflow.tracking import MlflowClient
from rich.table import Table

from features.config import DatasetConfig
from features.synth import generate
from pipelines.report import wide_console
from pipelines.tracking import resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
ZOO = ["shared_bottom", "mmoe", "cgc", "ple", "adatt", "home"]


def without_sequences(dataset: Path, directory: Path) -> Path:
    """A copy of the dataset config with no sequence feature (its paths made absolute)."""
    config = DatasetConfig.from_yaml(dataset)
    raw = yaml.safe_load(dataset.read_text())
    raw["features"] = [f for f in raw["features"] if f.get("kind") != "sequence"]
    raw["path"] = str(config.path)
    for table, resolved in zip(raw.get("side_tables", []), config.side_tables, strict=True):
        table["path"] = str(resolved.path)
    out = directory / f"{dataset.stem}-noseq.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def label(model: str, args: argparse.Namespace) -> str:
    name = f"{model}+{args.variant}" if args.variant else model
    return f"{name}-noseq" if args.no_sequences else name


def model_configs(model: str) -> list[str]:
    """``--config`` arguments of a model: ``home/flat`` is an overlay stacked after home.yaml."""
    base, _, overlay = model.partition("/")
    names = [base, model] if overlay else [base]
    return [a for n in names for a in ("--config", str(ROOT / "configs" / "model" / f"{n}.yaml"))]


def train(model: str, seed: int, args: argparse.Namespace) -> None:
    command = [
        str(Path(sys.executable).parent / "ranker"),
        "fit",
        "--config",
        str(ROOT / "configs" / "trainer.yaml"),
        *model_configs(model),
        *shlex.split(args.fit_args),  # before the flags below: a --config there cannot undo them
        "--data.dataset",
        str(args.train_dataset),
        "--data.batch_size",
        str(args.batch_size),
        "--trainer.max_epochs",
        str(args.epochs),
        "--seed_everything",
        str(seed),
        "--trainer.logger.init_args.experiment_name",
        args.experiment,
        "--trainer.logger.init_args.run_name",
        f"{label(model, args)}-s{seed}",
        "--trainer.logger.init_args.checkpoint_dir",
        str(args.checkpoints),
    ]
    if args.log:
        command += ["--data.log_path", str(args.log)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode:
        sys.exit(f"{model} (seed {seed}) failed:\n{result.stderr[-4000:]}")
    print(f"{label(model, args):22s} seed {seed}: {time.perf_counter() - start:7.1f} s", flush=True)


def short_history(run_id: str, longest: int, client: MlflowClient) -> None:
    """Logs the run's test mean AUC / GAUC over the rows whose history (the model's first
    sequence) holds at most ``longest`` items, as ``test/history_maxN/<metric>/mean``."""
    from pipelines.checkpoints import load, locate
    from pipelines.evaluate import history_feature, score_split
    from ranker.metrics import task_metrics
    from ranker.scoring import probabilities

    key = f"test/history_max{longest}"
    if f"{key}/auc/mean" in client.get_run(run_id).data.metrics:
        return
    with tempfile.TemporaryDirectory() as tmp:
        module, data = load(locate(run_id, client, Path(tmp)), client, Path(tmp), None, None, 2048)
        if history_feature(data) is None:
            return
        scored, _ = score_split(module, data, "test")
    logits, labels, users = scored.outputs["logits"], scored.labels, scored.users
    rows = scored.lengths <= longest
    probs = probabilities(logits, module.calibrator)
    metrics = task_metrics(probs[rows], labels[rows], users[rows], module.task_names)
    client.log_metric(run_id, f"{key}/rows", float(rows.sum()))
    for name in ("auc/mean", "gauc/mean"):
        client.log_metric(run_id, f"{key}/{name}", metrics[name])


def cell(values: list[float]) -> str:
    """Mean ± std over seeds (the mean alone for one; ``-`` for none), NaNs left out."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = f"{np.mean(values):.4f}"
    return mean if len(values) == 1 else f"{mean}±{np.std(values):.3f}"


def table(args: argparse.Namespace, tasks: list[str], metric_name: str) -> Table:
    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    by_model: dict[str, list] = {}
    names = [m if not args.variant else f"{m}+{args.variant}" for m in args.models]
    rows = [v for m in names for v in (m, f"{m}-noseq")]
    for run in runs:
        model, _, seed = run.info.run_name.rpartition("-s")
        if model in rows and int(seed) in args.seeds and run.info.status == "FINISHED":
            by_model.setdefault(model, []).append(run)

    columns = [(metric_name, t) for t in [*tasks, "mean"]]
    if args.short_history is not None:
        for run in (r for rs in by_model.values() for r in rs):
            short_history(run.info.run_id, args.short_history, client)
        by_model = {m: [client.get_run(r.info.run_id) for r in rs] for m, rs in by_model.items()}
        columns.append((f"history_max{args.short_history}/{metric_name}", "mean"))
    out = Table(
        title=f"test {metric_name.upper()}, experiment {args.experiment}: best val "
        f"checkpoint of {args.epochs} epochs, seeds {args.seeds}"
    )
    out.add_column("model")
    for key, task in columns:
        out.add_column(
            task if key == metric_name else f"{task}, history <= {args.short_history}",
            justify="right",
        )
    out.add_column("params", justify="right")
    out.add_column("train s", justify="right")

    for model in rows:
        runs = by_model.get(model, [])
        if not runs:
            continue
        metric = [r.data.metrics for r in runs]
        seconds = [
            sum(m.value for m in client.get_metric_history(r.info.run_id, "train/epoch_seconds"))
            for r in runs
        ]
        out.add_row(
            model,
            *(cell([m.get(f"test/{k}/{t}", math.nan) for m in metric]) for k, t in columns),
            f"{int(metric[0].get('model/params', 0)):,}",
            f"{np.mean(seconds):.0f}",
        )
    oracle = [r.data.metrics for rs in by_model.values() for r in rs[:1]]
    if oracle and "oracle/test/auc/mean" in oracle[0]:
        out.add_row(
            "best achievable",
            *(f"{oracle[0].get(f'oracle/test/{k}/{t}', math.nan):.4f}" for k, t in columns),
            "",
            "",
            style="bold",
        )
    return out


def markdown(result: Table) -> str:
    """The same table as markdown, for RESULTS.md."""
    header = [str(c.header) for c in result.columns]
    cells = [[str(v) for v in c.cells] for c in result.columns]
    lines = [
        f"**{result.title}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*cells, strict=True)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "configs/data/synthetic.yaml")
    parser.add_argument("--log", type=Path, help="log path (generated first if missing)")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--models", nargs="+", default=ZOO)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--experiment", default="zoo")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables too")
    parser.add_argument("--no-sequences", action="store_true", help="leave sequences out")
    parser.add_argument("--fit-args", default="", help="more `ranker fit` flags, one string")
    parser.add_argument("--variant", default="", help="runs named <model>+<variant>")
    parser.add_argument(
        "--short-history",
        type=int,
        default=None,
        metavar="N",
        help="add the mean over test rows whose history holds at most N items",
    )
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory()
    args.train_dataset = (
        without_sequences(args.dataset, Path(scratch.name)) if args.no_sequences else args.dataset
    )
    config = DatasetConfig.from_yaml(args.dataset)
    if args.log and not args.log.exists():
        generate(args.log, rows=args.rows)
    if not args.table_only:
        for model in args.models:
            for seed in args.seeds:
                train(model, seed, args)
    for metric in ("auc", "gauc"):
        result = table(args, config.task_names, metric)
        wide_console().print(result)
        if args.markdown:
            print(markdown(result))
    if config.note:
        wide_console().print(config.note)


if __name__ == "__main__":
    main()
