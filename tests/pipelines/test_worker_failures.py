"""A loader worker that fails ends `ranker fit` with the worker's error, never a stall: a
worker that raises (a file whose pages only a worker reads is corrupt) and a worker killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from tests.pipelines.test_fit_e2e import RANKER, fit_args


def start(log: Path, work: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    args = fit_args(log, work / "checkpoints", "--data.num_workers", "2", *extra)
    return subprocess.Popen(
        [str(RANKER), *args], cwd=work, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_status(work: Path) -> str:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ranker")
    (run,) = client.search_runs([experiment.experiment_id])
    return run.info.status


def test_worker_error_ends_the_run_naming_the_file(tiny_log: Path, tmp_path: Path) -> None:
    log = shutil.copytree(tiny_log, tmp_path / "log")
    # A validation day whose item_category pages are garbage: the checks up front read the
    # time and label columns, the history pre-pass the user, ts, click and item_id columns,
    # the feature fit training days; only a loader worker reads it.
    victim = next(log.glob("date=2024-01-13/*.parquet"))
    meta = pq.read_metadata(victim)
    column = meta.schema.names.index("item_category")
    data = bytearray(victim.read_bytes())
    for group in range(meta.num_row_groups):
        chunk = meta.row_group(group).column(column)
        start_at = chunk.dictionary_page_offset or chunk.data_page_offset
        size = chunk.total_compressed_size
        noise = np.random.default_rng(group).integers(0, 256, size, dtype=np.uint8)
        data[start_at : start_at + size] = noise.tobytes()
    victim.write_bytes(bytes(data))
    process = start(log, tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    assert "DataLoader worker" in stderr and f"cannot read {victim}" in stderr
    assert run_status(tmp_path) == "FAILED"


def loader_workers(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def test_killed_worker_ends_the_run_with_its_error(tiny_log: Path, tmp_path: Path) -> None:
    process = start(tiny_log, tmp_path, "--trainer.max_epochs", "1000")
    deadline = time.monotonic() + 300
    while len(workers := loader_workers(process.pid)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    time.sleep(1)
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)  # ends: no silent stall
    assert process.returncode not in (0, None)
    assert f"DataLoader worker (pid {workers[0]}) is killed by signal" in stderr or (
        f"DataLoader worker (pid(s) {workers[0]}) exited unexpectedly" in stderr
    ), stderr[-3000:]
    assert run_status(tmp_path) == "FAILED"
