"""Uplift on Hillstrom: our uplift models beside causalml's, one table of test normalised Qini
per task and per e-mail against no e-mail (mean ± std over seeds).

    python benchmarks/uplift.py                                     # ours and the peers
    python benchmarks/uplift.py --models mtmt --seeds 0 1 2 --no-peers
    python benchmarks/uplift.py --models mtmt --variant no_attention \\
        --fit-args "--model.network.init_args.interaction mlp"     # an ablation
    python benchmarks/uplift.py --table-only                        # re-print from MLflow
    python benchmarks/uplift.py --dataset ... --latency exports/<run>/model.onnx  # 1 / 1,000

    python benchmarks/uplift.py --dataset configs/data/synthetic_uplift.yaml   # + best achievable

Data: ``configs/data/hillstrom_uplift.yaml`` (64,000 customers, randomised over three arms;
the split 50 / 25 / 25 at random within each arm, seed 0; written by
``benchmarks/suite.py --prepare hillstrom`` when missing).

**Ours** is ``ranker fit`` with the model's defaults and nothing else but the budget (epochs,
batch size, seed); the figures are the best-validation checkpoint's (mean Qini on val) test
metrics as ``ranker fit`` logs them. ``mmoe`` on this data is the S-learner (the arm a
one-hot input), ``arm_heads`` the multi-head baseline, ``mtmt`` MTMT.

**The peers** (``pip install causalml==0.18.0 lightgbm``): causalml's S-, T- and X-learners
with LightGBM classifiers at their defaults, and its uplift random forest (KL divergence), one
model per task, fitted on the training split's rows with the same features (categories as
integer codes), seeded; their test uplift per arm is scored by ``ranker.uplift_metrics``, the
same code as ours. Every result is an MLflow run in the experiment ``uplift-hillstrom`` named
``<model>-s<seed>``; a finished run is reused (``--retrain``), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.suite import finished_runs, machine, prepare_hillstrom  # noqa: E402
from benchmarks.zoo import train  # noqa: E402
from features.config import DatasetConfig  # noqa: E402
from features.state import TreatmentState, fit_arms  # noqa: E402
from features.synth_uplift import true_probabilities  # noqa: E402
from pipelines.report import wide_console  # noqa: E402
from pipelines.tracking import resolve_tracking_uri  # noqa: E402
from ranker.uplift_metrics import uplift_metrics  # noqa: E402

CONFIG = ROOT / "configs" / "data" / "hillstrom_uplift.yaml"
EXPERIMENT = "uplift-hillstrom"  # uplift-<dataset name> for another --dataset
OURS = ["mmoe", "arm_heads", "mtmt"]
PEERS = ["s_learner_lgbm", "t_learner_lgbm", "x_learner_lgbm", "uplift_forest_kl"]


def ready(config: DatasetConfig) -> None:
    path = Path(config.path)
    if config.name == "synthetic_uplift" and not path.exists():
        sys.exit(
            f"{path} is missing: ranker synth --treatments 3 --rows 100000 --out {path.parent}"
        )
    if not path.exists() or config.split.column not in pl.read_parquet_schema(path):
        print(f"writing {path} ...", flush=True)
        prepare_hillstrom(path)


def arms_of(frame: pl.DataFrame, config: DatasetConfig) -> TreatmentState:
    """The arms as the model fits them (control first, then sorted), with the arm index."""
    return fit_arms(frame.lazy(), config)


def test_metrics(
    probabilities: np.ndarray, test: pl.DataFrame, arms: TreatmentState, config: DatasetConfig
) -> dict[str, float]:
    """``uplift_metrics`` of the test rows scored ``probabilities [N, A, T]``."""
    index = test.select(arms.index_expr()).to_series().to_numpy()
    labels = test.select([task.label for task in config.tasks]).to_numpy().astype(np.float32)
    propensity = test[arms.propensity].to_numpy() if arms.propensity else None
    tasks = [task.name for task in config.tasks]
    metrics = uplift_metrics(probabilities, labels, index, arms.arms, tasks, propensity)
    return {f"test/{k}": v for k, v in metrics.items()}


def best_achievable(config: DatasetConfig) -> dict[str, float] | None:
    """On generated data, the test metrics of the true uplift (``p_<task>_<arm>``)."""
    frame = pl.read_parquet(config.path)
    arms, tasks = arms_of(frame, config), [task.name for task in config.tasks]
    if not {f"p_{task}_{arm}" for arm in arms.arms for task in tasks} <= set(frame.columns):
        return None
    test = frame.filter(pl.col(config.split.column) == "test")
    return test_metrics(true_probabilities(test, arms.arms, tasks), test, arms, config)


# -- the peers ---------------------------------------------------------------------------------


def peer_model(name: str, seed: int, control: str):
    from causalml.inference.meta import BaseSClassifier, BaseTClassifier, BaseXClassifier
    from causalml.inference.tree import UpliftRandomForestClassifier
    from lightgbm import LGBMClassifier, LGBMRegressor

    def lgbm(cls):
        return cls(random_state=seed, n_jobs=2, verbose=-1)

    if name == "s_learner_lgbm":
        return BaseSClassifier(learner=lgbm(LGBMClassifier), control_name=control)
    if name == "t_learner_lgbm":
        return BaseTClassifier(learner=lgbm(LGBMClassifier), control_name=control)
    if name == "x_learner_lgbm":
        return BaseXClassifier(
            outcome_learner=lgbm(LGBMClassifier),
            effect_learner=lgbm(LGBMRegressor),
            control_name=control,
        )
    return UpliftRandomForestClassifier(
        control_name=control, evaluationFunction="KL", random_state=seed, n_jobs=2
    )


def features(frame: pl.DataFrame, config: DatasetConfig) -> np.ndarray:
    """The config's features as a float matrix: categories as integer codes (sorted values)."""
    columns = []
    for spec in config.features:
        column = frame[spec.column]
        if spec.kind == "categorical" and not column.dtype.is_numeric():
            column = column.rank("dense")
        columns.append(column.cast(pl.Float64).to_numpy())
    return np.stack(columns, 1)


def train_peer(name: str, seed: int, config: DatasetConfig) -> dict[str, float]:
    t = config.treatment
    frame = pl.read_parquet(config.path)
    split = frame[config.split.column]
    train_rows, test_rows = frame.filter(split == "train"), frame.filter(split == "test")
    arms = arms_of(frame, config)
    x_train, x_test = features(train_rows, config), features(test_rows, config)
    arm_train = train_rows[t.column].cast(pl.String).to_numpy()
    probabilities = np.zeros((len(test_rows), len(arms.arms), len(config.tasks)), np.float32)
    start = time.perf_counter()
    for k, task in enumerate(config.tasks):
        model = peer_model(name, seed, str(t.control))
        y = train_rows[task.label].to_numpy().astype(int)
        model.fit(x_train, treatment=arm_train, y=y)
        effect = np.asarray(model.predict(x_test))  # [N, arms besides control]
        groups = model.t_groups if hasattr(model, "t_groups") else model.classes_[1:]
        for column, arm in enumerate(groups):
            probabilities[:, arms.arms.index(str(arm)), k] = effect[:, column]
    metrics = test_metrics(probabilities, test_rows, arms, config)
    return metrics | {"fit_seconds": time.perf_counter() - start}


def run_peers(args: argparse.Namespace, config: DatasetConfig) -> None:
    client = MlflowClient(resolve_tracking_uri())
    done = finished_runs(client, args.experiment)
    experiment = client.get_experiment_by_name(args.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(args.experiment)
    )
    for peer in args.peers:
        for seed in args.seeds:
            name = f"{peer}-s{seed}"
            if name in done and not args.retrain:
                continue
            metrics = train_peer(peer, seed, config)
            run = client.create_run(experiment_id, run_name=name)
            for key, value in metrics.items():
                if math.isfinite(value):
                    client.log_metric(run.info.run_id, key, value)
            client.set_terminated(run.info.run_id)
            print(f"{name:28s} {metrics['fit_seconds']:7.1f} s", flush=True)


# -- ours --------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> None:
    done = finished_runs(MlflowClient(resolve_tracking_uri()), args.experiment)
    for model in args.models:
        name = f"{model}+{args.variant}" if args.variant else model
        for seed in args.seeds:
            if f"{name}-s{seed}" in done and not args.retrain:
                continue
            train(model, seed, argparse.Namespace(
                fit_args=args.fit_args, train_dataset=args.dataset, log=None,
                batch_size=args.batch_size, epochs=args.epochs, experiment=args.experiment,
                variant=args.variant, no_sequences=False, checkpoints=args.checkpoints,
            ))  # fmt: skip


# -- the table ---------------------------------------------------------------------------------


def cell(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    spread = f" ± {np.std(values):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{spread}"


def table(config: DatasetConfig, experiment: str) -> Table:
    client = MlflowClient(resolve_tracking_uri())
    runs = finished_runs(client, experiment)
    arms = arms_of(pl.read_parquet(config.path), config).arms[1:]
    tasks = [t.name for t in config.tasks]
    columns = [(task, arm) for task in tasks for arm in arms]
    out = Table(title=f"test normalised Qini vs {config.treatment.control} ({machine()})")
    out.add_column("model")
    for task, arm in columns:
        out.add_column(f"{task}: {arm}", justify="right")
    for task in tasks:
        out.add_column(f"{task} mean", justify="right")
    out.add_column("seeds", justify="right")
    out.add_column("s / epoch", justify="right")
    models: dict[str, list] = {}
    for name, run in runs.items():
        models.setdefault(name.rsplit("-s", 1)[0], []).append(run.data.metrics)
    best = best_achievable(config)
    if best is not None:
        models["(best achievable: the true uplift)"] = [best]
    for model, metrics in sorted(models.items()):
        row = [cell([m.get(f"test/qini/{t}/{a}", math.nan) for m in metrics]) for t, a in columns]
        for task in tasks:
            row.append(cell([
                float(np.mean([m.get(f"test/qini/{task}/{a}", math.nan) for a in arms]))
                for m in metrics
            ]))  # fmt: skip
        seconds = [m["train/epoch_seconds"] for m in metrics if "train/epoch_seconds" in m]
        row += [str(len(metrics)), f"{np.mean(seconds):.1f}" if seconds else "-"]
        out.add_row(model, *row)
    return out


def latency(graph: Path, config: DatasetConfig, repeats: int = 300) -> Table:
    """The exported graph's scoring time (onnxruntime, 1 intra-op thread) for 1 and 1,000
    customers of the test split, every arm and task scored; then ``POST /v1/uplift`` of the
    same customers by id (features from the user table beside the graph) to ``ranker serve
    --threads 1``, one client, request after request for 10 s."""
    import json

    import onnxruntime as ort

    from benchmarks.serve import http_run, percentiles, served
    from features.contract import META, RawInput
    from features.onnx_graph import raw_feeds

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map  # the graph's inputs, as the service reads
    inputs = [RawInput(**c) for c in json.loads(meta[META.INPUTS])]
    test = pl.read_parquet(config.path).filter(pl.col(config.split.column) == "test")
    out = Table(title=f"{graph}: 1 thread ({machine()})")
    for column in ("scored by", "customers", "p50 ms", "p99 ms", "customers / s"):
        out.add_column(column, justify="right")
    for rows in (1, 1000):
        feeds = raw_feeds(test.head(rows), inputs)
        for _ in range(20):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        p50, p99 = np.percentile(times, [50, 99]) * 1000
        out.add_row("graph", f"{rows:,}", f"{p50:.3f}", f"{p99:.3f}", f"{rows / p50 * 1e3:,.0f}")
    with served(graph, "--threads", "1") as url:
        for rows in (1, 1000):
            users = [{"id": i} for i in test[config.user_key].head(rows).to_list()]
            times, _ = http_run(url, {"users": users}, 1, 10.0, "/v1/uplift")
            p50, p99 = percentiles(times)
            row = [f"{rows:,}", f"{p50:.3f}", f"{p99:.3f}", f"{rows / p50 * 1e3:,.0f}"]
            out.add_row("POST /v1/uplift", *row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=CONFIG)
    parser.add_argument("--models", nargs="*", default=OURS)
    parser.add_argument("--peers", nargs="*", default=PEERS)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--fit-args", default="")
    parser.add_argument("--variant", default="")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--latency", type=Path, help="an exported graph: time it, nothing else")
    args = parser.parse_args()
    config = DatasetConfig.from_yaml(args.dataset)
    args.experiment = EXPERIMENT if args.dataset == CONFIG else f"uplift-{config.name}"
    ready(config)
    if args.latency:
        wide_console().print(latency(args.latency, config))
        return
    if not args.table_only:
        run_ours(args)
        if not args.no_peers:
            run_peers(args, config)
    wide_console().print(table(config, args.experiment))


if __name__ == "__main__":
    main()
