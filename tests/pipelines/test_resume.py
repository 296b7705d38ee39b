"""Killing `ranker fit` mid-epoch and restarting it from its last checkpoint continues the same
MLflow run and takes exactly the steps the uninterrupted run took."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import requeued_checkpoint
from tests.pipelines.test_fit_e2e import fit_args

EVERY = 6  # optimiser steps between resume checkpoints (two per batch)


def command(log: Path, work: Path, *extra: str, workers: int = 2) -> list[str]:
    """``ranker fit`` with resume checkpoints every few steps. ``workers``: loader processes
    (each spawned worker costs seconds here; the requeue test keeps them, the mid-epoch test
    runs in one stream: the multi-worker plan's resume is exact in test_datamodule)."""
    return [
        sys.executable,
        "-m",
        "pipelines.commands",
        *fit_args(log, work / "checkpoints", "--trainer.max_epochs", "1"),
        "--data.num_workers",
        str(workers),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
        "{monitor: val/monitor, mode: max, save_top_k: 1}}, "
        "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
        f"{{save_last: true, save_top_k: 0, every_n_train_steps: {EVERY}}}}}]",
        *extra,
    ]


def losses(client: MlflowClient, run_id: str) -> dict[int, set[float]]:
    found: dict[int, set[float]] = {}
    for point in client.get_metric_history(run_id, "train/loss"):
        found.setdefault(point.step, set()).add(point.value)
    return found


def test_killed_fit_resumes_mid_epoch_into_the_same_run(tiny_log: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    done = subprocess.run(
        command(tiny_log, whole, workers=0), cwd=whole, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # The same run, killed (SIGKILL: no chance to clean up) once a resume checkpoint exists.
    process = subprocess.Popen(
        command(tiny_log, broken, workers=0),
        cwd=broken,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not list(broken.glob("checkpoints/*/*/checkpoints/last.ckpt")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (last,) = broken.glob("checkpoints/*/*/checkpoints/last.ckpt")
    saved = torch.load(last, weights_only=False)  # written by this test
    progress = saved["RankerDataModule"]["progress"]
    assert progress["batches"] > 0  # taken mid-epoch

    resumed = subprocess.run(
        command(tiny_log, broken, "--ckpt_path", str(last), workers=0),
        cwd=broken,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ranker")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2  # the resumed run is the killed one, continued
    reference, continued = runs[0], runs[1]
    assert continued.info.run_id == saved["mlflow"]["run_id"]
    assert continued.info.status == "FINISHED"
    assert continued.data.tags["resumed_from"] == str(last)

    expected, got = losses(client, reference.info.run_id), losses(client, continued.info.run_id)
    after = [step for step in expected if step > saved["global_step"]]
    assert len(after) > 20
    for step in after:  # every remaining step, the same batch on the same weights
        assert got[step] == expected[step], step
    for key in ("val/gauc/mean", "test/auc/mean", "val/auc/click"):
        assert continued.data.metrics[key] == reference.data.metrics[key], key


def test_requeued_slurm_job_continues_its_run(tiny_log: Path, tmp_path: Path) -> None:
    """SLURM's requeue signal: Lightning saves ``hpc_ckpt_1.ckpt`` and asks ``scontrol`` to
    requeue the job; the job's command, run again, resumes from it into the same MLflow run."""
    tools = tmp_path / "bin"
    tools.mkdir()
    requeues = tmp_path / "requeues.txt"
    scontrol = tools / "scontrol"  # no SLURM here: a stand-in records what Lightning asks of it
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {requeues}\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{tools}:{os.environ['PATH']}",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ranker",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    job = tmp_path / "job"
    job.mkdir()
    process = subprocess.Popen(
        command(tiny_log, job), cwd=job, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not list(job.glob("checkpoints/*/*/checkpoints/last.ckpt")):  # training is under way
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` sends
    hpc = job / "hpc_ckpt_1.ckpt"
    while not (hpc.exists() and requeues.exists()):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (running,) = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])
    assert running.info.status == "RUNNING"  # to be continued, not ended by the signal
    process.send_signal(signal.SIGTERM)  # then SLURM stops the job
    process.wait(timeout=120)
    assert requeues.read_text() == "requeue 4242\n"
    saved = torch.load(hpc, weights_only=False)  # written by this test

    rerun = subprocess.run(command(tiny_log, job), cwd=job, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    experiment = client.get_experiment_by_name("ranker")
    (run,) = client.search_runs([experiment.experiment_id])  # no second run
    assert run.info.run_id == saved["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == str(hpc)
    assert max(losses(client, run.info.run_id)) > saved["global_step"]
    assert "test/gauc/mean" in run.data.metrics  # the rerun finished training and reported


def test_requeued_checkpoint_is_the_newest_and_only_under_slurm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in (2, 9, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert requeued_checkpoint(tmp_path) is None  # not a SLURM job: Lightning ignores them too
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "ranker")
    assert requeued_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"
    assert requeued_checkpoint(tmp_path / "elsewhere") is None
