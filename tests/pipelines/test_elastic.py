"""A DDP rank killed mid-epoch under ``torchrun --max-restarts 1``: torchrun starts the workers
again, they resume from the last checkpoint into the same MLflow run, and every remaining step
trains the batch the uninterrupted job trained (each row once per epoch)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import ELASTIC_MARK, restarted_run
from tests.pipelines.test_ddp import TORCHRUN
from tests.pipelines.test_resume import command, losses
from tests.serving.conftest import free_port

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def torchrun_fit(log: Path, work: Path) -> list[str]:
    fit = command(log, work, *DDP, workers=0)[1:]  # "-m pipelines.commands fit ..."
    # The c10d rendezvous, as the README's multi-node command: a restart rendezvouses anew
    # (static --master_port rendezvous hands the restarted workers the dead ones' addresses).
    return [str(TORCHRUN), "--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend",
            "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *fit]  # fmt: skip


def rank_process(agent: int, rank: int) -> int | None:
    """The pid of worker ``rank`` that torchrun (pid ``agent``) started, if running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_rank_killed_under_torchrun_resumes_into_the_same_run(
    tiny_log: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        # torch's workaround (pytorch#135712, the README's command): restarted workers sharing
        # the rendezvous store can read the dead workers' addresses (gloo: connection refused)
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    done = subprocess.run(
        torchrun_fit(tiny_log, whole), cwd=whole, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    job = subprocess.Popen(
        torchrun_fit(tiny_log, broken), cwd=broken, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(broken.glob("checkpoints/*/*/checkpoints/last.ckpt")):
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim = rank_process(job.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)  # no chance to clean up
    (last,) = broken.glob("checkpoints/*/*/checkpoints/last.ckpt")
    saved = torch.load(last, weights_only=False)  # what the restart resumes from: no rank
    # can take a step (nor write a checkpoint) while another is dead
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    assert saved["RankerDataModule"]["progress"]["batches"] > 0  # killed mid-epoch
    assert (broken / ELASTIC_MARK.format("none")).exists()

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ranker")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2  # the restarted workers continued the killed job's run
    reference, continued = runs
    assert continued.info.run_id == saved["mlflow"]["run_id"]
    assert continued.info.status == "FINISHED"
    resumed_from = Path(continued.data.tags["resumed_from"])
    assert resumed_from == last.resolve()

    expected, got = losses(client, reference.info.run_id), losses(client, continued.info.run_id)
    after = [step for step in expected if step > saved["global_step"]]
    assert after  # steps trained after the resume
    assert max(got) == max(expected)  # as many steps as the uninterrupted job: no batch twice
    for step in after:  # every step after the resume: the same batch on the same weights
        assert got[step] == expected[step], step
    for key in ("val/gauc/mean", "test/auc/mean"):
        assert continued.data.metrics[key] == reference.data.metrics[key], key


def test_only_a_restart_resumes(tmp_path: Path, monkeypatch) -> None:
    mark = tmp_path / ELASTIC_MARK.format("job7")
    mark.write_text(f'{{"run_id": "r1", "last": "{tmp_path / "last.ckpt"}"}}')
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarted_run(tmp_path) == (None, "r1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restarted_run(tmp_path) is None  # a first attempt starts its own run ...
    assert not mark.exists()  # ... and an earlier job's mark is gone
    mark.write_text(f'{{"run_id": "r1", "last": "{tmp_path / "last.ckpt"}"}}')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarted_run(tmp_path) == (None, "r1")  # died before its first checkpoint
    (tmp_path / "last.ckpt").touch()
    assert restarted_run(tmp_path) == (tmp_path / "last.ckpt", "r1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert restarted_run(tmp_path) is None  # not under torchrun
