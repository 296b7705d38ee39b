"""The tracking server away during training: the run goes on and loses no metric, whether the
server comes back before training ends or only after (then through the file it leaves)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from tests.pipelines.test_fit_e2e import (
    fit_args,
    free_port,
    start_mlflow_server,
    stop_mlflow_server,
)


def fit(log: Path, work: Path, url: str, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # past the client's retries at once
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    args = fit_args(log, work / "checkpoints", "--trainer.max_epochs", "3",
                    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.logger.init_args.outage_retry_seconds", "0.5", *extra)  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.commands", *args], cwd=work, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def the_run(url: str):
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("ranker")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return client, (runs[0] if runs else None)


def wait_for_training(url: str, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        client, run = the_run(url)
        if run is not None and client.get_metric_history(run.info.run_id, "train/loss"):
            return
        time.sleep(0.2)


def steps_without_gaps(client: MlflowClient, run_id: str) -> None:
    steps = sorted({p.step for p in client.get_metric_history(run_id, "train/loss")})
    assert len(steps) > 10
    assert len(set(np.diff(steps))) == 1, steps  # every logged step is there


@dataclass
class Outage:
    """A fit against a real MLflow server, stopped once training is under way."""

    root: Path
    port: int
    server: subprocess.Popen
    job: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def restart(self) -> None:
        self.server = start_mlflow_server(self.root, self.port)


@contextmanager
def outage(log: Path, root: Path, *extra: str) -> Iterator[Outage]:
    port = free_port()
    state = Outage(root, port, start_mlflow_server(root, port))
    state.work.mkdir()
    try:
        state.job = fit(log, state.work, state.url, *extra)
        wait_for_training(state.url, state.job)
        stop_mlflow_server(state.server)
        yield state
    finally:
        if state.job is not None:
            state.job.kill()
        stop_mlflow_server(state.server)


def test_a_server_back_before_training_ends_gets_every_metric(
    tiny_log: Path, tmp_path: Path
) -> None:
    with outage(tiny_log, tmp_path) as away:
        time.sleep(3)  # training goes on, its metrics held
        away.restart()
        output, _ = away.job.communicate(timeout=600)
        assert away.job.returncode == 0, output[-3000:]
        assert "unreachable" in output and "held metrics sent" in output
        client, run = the_run(away.url)
        assert run.info.status == "FINISHED"
        steps_without_gaps(client, run.info.run_id)
        assert "test/gauc/mean" in run.data.metrics  # the report reached it too


def test_a_server_away_past_the_end_leaves_the_metrics_to_send(
    tiny_log: Path, tmp_path: Path
) -> None:
    patience = ("--trainer.logger.init_args.outage_patience_seconds", "1")
    with outage(tiny_log, tmp_path, *patience) as away:
        output, _ = away.job.communicate(timeout=600)
        assert away.job.returncode == 2, output[-3000:]
        (unsent,) = away.work.glob("checkpoints/*/*/unsent.jsonl")
        assert f"are in {unsent}" in output
        assert f"python -m pipelines.tracking {unsent} --tracking_uri {away.url}" in output
        assert list(away.work.glob("checkpoints/*/*/checkpoints/*.ckpt"))  # checkpoints kept

        away.restart()
        client, run = the_run(away.url)
        before = client.get_metric_history(run.info.run_id, "train/loss")
        send = [sys.executable, "-m", "pipelines.tracking", str(unsent), "--tracking_uri",
                away.url]  # fmt: skip
        subprocess.run(send, check=True, capture_output=True, cwd=away.work)
        steps_without_gaps(client, run.info.run_id)  # the held ones arrived, in place
        after = client.get_metric_history(run.info.run_id, "train/loss")
        assert max(p.step for p in after) > max(p.step for p in before)


def test_a_requeue_signal_mid_write_does_not_lock_the_store(tmp_path: Path) -> None:
    """SLURM's SIGUSR1 runs Lightning's handler between two statements of this process's own
    write to SQLite; its ``finalize("finished")`` must not write again (the store would stay
    locked against it for the busy timeout, and the job crashed: seen in CI)."""
    from mlflow.entities import Metric
    from sqlalchemy import event

    from pipelines.tracking import MLflowLogger

    logger = MLflowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          checkpoint_dir=str(tmp_path / "checkpoints"))  # fmt: skip
    run_id = logger.run_id
    client = logger.experiment
    engine = client._tracking_client.store.engine
    handled = []

    def signal_arrives(*_: object) -> None:  # between the INSERT and the COMMIT
        if not handled:
            handled.append(time.monotonic())
            logger.finalize("finished")
            handled.append(time.monotonic())

    event.listen(engine, "after_cursor_execute", signal_arrives)
    try:
        client.log_batch(run_id, metrics=[Metric("train/loss", 0.5, 0, 1)])
    finally:
        event.remove(engine, "after_cursor_execute", signal_arrives)
    assert len(handled) == 2 and handled[1] - handled[0] < 1.0  # nothing waited on the lock
    assert client.held == []
    run = MlflowClient(logger.tracking_uri).get_run(run_id)
    assert run.data.metrics == {"train/loss": 0.5}  # the interrupted write completed
    assert run.info.status == "RUNNING"  # the requeued job continues it
    logger.finalize("success")
    assert MlflowClient(logger.tracking_uri).get_run(run_id).info.status == "FINISHED"
