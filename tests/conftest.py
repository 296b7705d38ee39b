"""Shared fixtures: a tiny generated log (written once per session), the real KuaiRand data, and
a few real tiny runs in a real SQLite MLflow store (trained once, for the pipeline and serving
tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from features.synth import Exposure, generate
from pipelines.commands import main
from pipelines.export import Exported, export

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SYNTHETIC_CONFIG = CONFIGS / "data" / "synthetic.yaml"
KUAIRAND_CONFIG = CONFIGS / "data" / "kuairand.yaml"
KUAIRAND_DIR = ROOT.parent / "shared" / "data" / "kuairand"


@pytest.fixture(scope="session", autouse=True)
def history_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Derived histories cached in the session's temporary directory (child processes too)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["RANKER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 days, 30k impressions, small row groups so a split spans several pieces. Items shown
    by popularity and no day-to-day interest swing (the log before 2026-12-07): 50 impressions
    a user are too few for the default log's interest of the day to be learnt in the tiny
    epochs these tests train (a logistic peer scored 0.496 mean AUC on it); the default log
    is tested in ``tests/features/test_synth.py`` and measured in the benchmarks."""
    out = tmp_path_factory.mktemp("tiny") / "log"
    return generate(
        out, rows=30_000, users=600, items=1_500, authors=200, seed=7, rows_per_group=1_000,
        exposure=Exposure(), swing=0.0,
    )  # fmt: skip


@dataclass
class Runs:
    uri: str
    mmoe: str
    home: str
    two_tasks: str  # trained on a dataset with only two of the tasks
    checkpoints: Path


def fit(log: Path, uri: str, checkpoints: Path, model: str, *extra: str) -> str:
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "trainer.yaml"),
            "--config",
            str(CONFIGS / "model" / f"{model}.yaml"),
            "--data.dataset",
            str(SYNTHETIC_CONFIG),
            "--data.log_path",
            str(log),
            "--data.batch_size",
            "512",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
            "{monitor: val/monitor, mode: max, save_top_k: 1}}]",
            "--trainer.logger.init_args.tracking_uri",
            uri,
            "--trainer.logger.init_args.checkpoint_dir",
            str(checkpoints),
            "--model.network.init_args.expert_hidden",
            "[32, 16]",
            *extra,
        ]
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ranker")
    return client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[
        0
    ].info.run_id


@pytest.fixture(scope="session")
def runs(tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    checkpoints = root / "checkpoints"
    mmoe = fit(tiny_log, uri, checkpoints, "mmoe", "--model.network.init_args.num_experts", "3")
    home = fit(tiny_log, uri, checkpoints, "home")
    two = root / "two_tasks.yaml"
    config = SYNTHETIC_CONFIG.read_text()
    kept = [line for line in config.splitlines() if "truth: p_" not in line]
    kept += [
        "  - {name: click, label: click, group: watch}",
        "  - {name: like, label: like, group: interaction}",
    ]
    two.write_text("\n".join(kept).replace("path: ../../data/synthetic", f"path: {tiny_log}"))
    two_tasks = fit(tiny_log, uri, checkpoints, "mmoe", "--data.dataset", str(two))
    return Runs(uri, mmoe, home, two_tasks, checkpoints)


@pytest.fixture(scope="session")
def exported(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The HoME run exported once (registered as ``ranker-serving-test``, version 1)."""
    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    return export(
        run=runs.home, name="ranker-serving-test", out=out, tracking_uri=runs.uri, quiet=True
    )


@dataclass
class UpliftRun:
    uri: str
    run_id: str
    config: Path  # the dataset config (generated customers, three arms, two tasks)
    exported: Exported  # the MTMT run exported (not registered), feature tables beside


def fit_uplift(root: Path, model: str) -> tuple[str, str, Path]:
    """``ranker fit`` of an uplift model on 6,000 generated customers: (store, run id, config)."""
    from features.synth_uplift import generate_uplift
    from tests.features.test_treatment import write

    config = write(root, generate_uplift(rows=6000, treatments=3, seed=1))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    main([
        "fit", "--config", str(CONFIGS / "trainer.yaml"),
        "--config", str(CONFIGS / "model" / f"{model}.yaml"),
        "--data.dataset", str(config), "--data.batch_size", "512",
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.tracking_uri", uri,
        "--trainer.logger.init_args.checkpoint_dir", str(root / "checkpoints"),
        "--model.network.init_args.expert_hidden", "[32, 16]",
    ])  # fmt: skip
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])
    return uri, run.info.run_id, config


@pytest.fixture(scope="session")
def uplift_run(tmp_path_factory: pytest.TempPathFactory) -> UpliftRun:
    """MTMT fitted once and exported (the uplift fit, predict and serving tests share it)."""
    root = tmp_path_factory.mktemp("uplift")
    uri, run_id, config = fit_uplift(root, "mtmt")
    exported = export(
        run=run_id, tracking_uri=uri, quiet=True, register=False,
        out=root / "export" / "model.onnx",
    )  # fmt: skip
    return UpliftRun(uri, run_id, config, exported)
