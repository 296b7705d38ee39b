"""`ranker fit` end to end on a tiny generated log: trains, tracks in MLflow, reports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.commands import main
from tests.conftest import CONFIGS, ROOT, SYNTHETIC_CONFIG

TASKS = ("click", "effective_view", "long_view", "like", "comment", "forward", "follow", "collect")
RANKER = Path(sys.executable).parent / "ranker"
MLFLOW = Path(sys.executable).parent / "mlflow"


def fit_args(log: Path, checkpoints: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "trainer.yaml"),
        "--config",
        str(CONFIGS / "model" / "mmoe.yaml"),
        "--data.dataset",
        str(SYNTHETIC_CONFIG),
        "--data.log_path",
        str(log),
        "--data.batch_size",
        "512",
        "--data.num_workers",
        "0",
        "--trainer.max_epochs",
        "2",
        "--trainer.logger.init_args.checkpoint_dir",
        str(checkpoints),
        "--model.network.init_args.num_experts",
        "3",
        "--model.network.init_args.expert_hidden",
        "[64, 32]",
        *extra,
    ]


def all_artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def check_run(client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name("ranker")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    metrics = run.data.metrics
    for task in TASKS:
        for stage in ("val", "test"):
            for metric in ("auc", "gauc", "logloss", "calibration", "ece"):
                assert f"{stage}/{metric}/{task}" in metrics
        assert 0.6 < metrics[f"oracle/val/auc/{task}"] < 0.95
    assert metrics["val/auc/mean"] > 0.55  # it learned something in two tiny epochs
    assert metrics["data/rows/train"] > 0 and "train/samples_per_sec" in metrics
    assert metrics["data/skipped_files"] == 0
    assert run.data.params["selection/metric"] == "val/gauc/mean"  # users group here
    # Calibrated on validation after training: ECE no worse there, the map logged.
    assert metrics["calibration/val/ece_after/mean"] <= metrics["calibration/val/ece_before/mean"]
    assert metrics["calibration/scale/click"] > 0
    weights = client.get_metric_history(run.info.run_id, "train/task_weight/click")
    assert [w.value for w in weights] == [1.0, 1.0]  # fixed, logged every epoch
    losses = client.get_metric_history(run.info.run_id, "train/loss/click")
    assert len(losses) == 2 and all(0 < p.value < 1 for p in losses)  # the epoch's mean
    history = client.get_metric_history(run.info.run_id, "val/gauc/mean")
    assert len(history) >= 2  # one per epoch, then the best checkpoint's re-validation
    assert run.data.tags["model"] == "MMoE" and run.data.tags["dataset"] == "synthetic"
    assert run.data.params["model.network.init_args.num_experts"] == "3"
    artifacts = all_artifacts(client, run.info.run_id)
    for name in (
        "config.yaml",
        "feature_state/feature_state.json",
        "data/accounting.md",
        "dataset/synthetic.yaml",
        "report.md",
    ):
        assert name in artifacts
    assert any(a.endswith(".ckpt") for a in artifacts)


def test_fit_writes_a_run_to_the_embedded_sqlite_store(
    tiny_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    main(fit_args(tiny_log, tmp_path / "checkpoints"))
    assert (tmp_path / "mlflow.db").exists()
    check_run(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    printed = capsys.readouterr().out
    assert "MMoE on synthetic" in printed and "best AUC" in printed
    for task in TASKS:
        assert task in printed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port``, its store and artifacts in ``root``, once it
    answers ``/health`` (the same store again after a restart)."""
    log = (root / "server.log").open("a")
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError((root / "server.log").read_text()[-3000:])
        time.sleep(0.5)


def stop_mlflow_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(server)


def test_fit_against_a_real_mlflow_server_skipping_a_corrupt_file(
    tiny_log: Path, tmp_path: Path, mlflow_server: str
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    work = tmp_path / "work"
    log = shutil.copytree(tiny_log, work / "log")
    victim = sorted(log.rglob("*.parquet"))[0]  # a training day
    victim.write_bytes(victim.read_bytes()[:-100] + b"PAR1")  # footer cut
    args = fit_args(log, work / "checkpoints", "--trainer.max_epochs", "1")
    result = subprocess.run(
        [str(RANKER), *args, "--data.skip_corrupt_files", "true"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (work / "mlflow.db").exists()  # everything went to the server
    assert "MMoE on synthetic" in result.stdout
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])[0]
    assert "val/gauc/click" in run.data.metrics
    artifacts = all_artifacts(client, run.info.run_id)
    assert "feature_state/feature_state.json" in artifacts
    assert run.data.metrics["data/skipped_files"] == 1  # counted in the run, and named
    listing = client.download_artifacts(run.info.run_id, "data/skipped_files.tsv", str(tmp_path))
    assert str(victim) in Path(listing).read_text()
    assert f"skipped: {victim} is a corrupt or truncated Parquet file" in result.stderr
    assert (tmp_path / "artifacts").exists()  # artifacts travelled through the server


def run_ranker(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RANKER), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_unknown_cli_key_fails_before_training(tiny_log: Path, tmp_path: Path) -> None:
    result = run_ranker(
        *fit_args(tiny_log, tmp_path, "--model.network.init_args.num_expertz", "4"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "num_expertz" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_dataset_config_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(SYNTHETIC_CONFIG.read_text().replace("user_key:", "user_kee:"))
    result = run_ranker(*fit_args(tmp_path, tmp_path, "--data.dataset", str(config)), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key(s) ['user_kee']" in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr


def test_fit_on_kuairand_with_shared_bottom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'kr.db'}")
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "trainer.yaml"),
            "--config",
            str(CONFIGS / "model" / "shared_bottom.yaml"),
            "--data.dataset",
            str(CONFIGS / "data" / "kuairand.yaml"),
            "--data.batch_size",
            "1024",
            "--data.num_workers",
            "0",
            "--trainer.max_epochs",
            "1",
            "--trainer.logger.init_args.checkpoint_dir",
            str(tmp_path / "ckpt"),
        ]
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'kr.db'}")
    run = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["data/rows/test"] == 3_835
    for task in ("click", "long_view", "like", "profile_enter", "comment", "forward", "follow"):
        assert f"test/gauc/{task}" in metrics
    assert metrics["test/auc/click"] > 0.55
    assert not any(k.startswith("oracle/") for k in metrics)  # real data: no true probabilities
    printed = capsys.readouterr().out
    assert "SharedBottom on kuairand" in printed and "liked or hated" in printed
