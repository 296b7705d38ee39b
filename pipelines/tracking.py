"""MLflow wiring: one place decides where runs go.

The embedded default is a SQLite store in the working directory; ``MLFLOW_TRACKING_URI``
points everything at a real ``mlflow server`` instead. Lightning's own default (a ``./mlruns``
file store) is refused by current MLflow, so the URI is always passed explicitly.

A tracking server that goes away during training does not stop it (``HoldingClient``): what
cannot be sent is held and sent, in order and with its own timestamps, once the server is
back. If it is still away when training ends, the held batches are written to a file and the
run stops with the command that sends them: nothing is lost silently.

    python -m pipelines.tracking <unsent.jsonl> [--tracking_uri URI]    # send them later
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import requests
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from features.config import ConfigError
from features.contract import resolve_tracking_uri


class TrackingError(ConfigError):
    """The tracking server stayed away: the run's unsent metrics are in a file."""


NO_SERVER = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
             requests.exceptions.RetryError, ConnectionError, TimeoutError)  # fmt: skip


def unreachable(err: MlflowException) -> bool:
    """Did the request fail for want of a server (after the client's own retries), rather
    than for what it asked? (The server's own answers are ``RestException``s.)"""
    return not isinstance(err, RestException) and isinstance(err.__context__, NO_SERVER)


RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


@contextmanager
def no_retries() -> Iterator[None]:
    """MLflow's client without its own retries (minutes of back-off while a server is known to
    be away; it reads the variable on every request)."""
    before = os.environ.get(RETRIES)
    os.environ[RETRIES] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RETRIES, None)
        else:
            os.environ[RETRIES] = before


def batch_json(batch: dict[str, Any]) -> str:
    return json.dumps(
        {
            "run_id": batch["run_id"],
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in batch["metrics"]],
            "params": [[p.key, p.value] for p in batch["params"]],
            "tags": [[t.key, t.value] for t in batch["tags"]],
        }
    )


def batch_of(line: str) -> dict[str, Any]:
    saved = json.loads(line)
    return {
        "run_id": saved["run_id"],
        "metrics": [Metric(k, v, t, s) for k, v, t, s in saved["metrics"]],
        "params": [Param(k, v) for k, v in saved["params"]],
        "tags": [RunTag(k, v) for k, v in saved["tags"]],
    }


class HoldingClient(MlflowClient):
    """An ``MlflowClient`` whose ``log_batch`` outlives a tracking server that is away: a
    batch it cannot send (no server, after the client's own retries) is held, and every
    held batch is sent, in order, before the next one, at most once per ``retry_s`` while the
    server stays away (so training is not held up by each attempt). A batch the server
    refuses for what it holds is an error, as before."""

    def __init__(self, tracking_uri: str, retry_s: float) -> None:
        super().__init__(tracking_uri)
        self.retry_s = retry_s
        self.held: list[dict[str, Any]] = []
        self.next_try = 0.0
        self.sending = False  # a signal handler may run mid-send: it must not send again

    def log_batch(  # type: ignore[override]
        self,
        run_id: str,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
        **kwargs: Any,
    ) -> None:
        batch = {"run_id": run_id, "metrics": list(metrics), "params": list(params)}
        self.held.append({**batch, "tags": list(tags), **kwargs})
        self.send_held()

    def send_held(self, now: bool = False) -> bool:
        """Sends the held batches (``now``: whatever the time since the last attempt); True
        when none is left. A call made while a send is under way (from a signal handler that
        interrupted it) sends nothing: the store is mid-transaction on this very thread."""
        if self.sending or (not now and time.monotonic() < self.next_try):
            return False
        self.sending = True
        try:
            return self._send_held()
        finally:
            self.sending = False

    def _send_held(self) -> bool:
        while self.held:
            try:
                with no_retries() if self.next_try else nullcontext():  # known away: one try
                    super().log_batch(**self.held[0])
            except MlflowException as err:
                if not unreachable(err):
                    self.held.pop(0)
                    raise
                if not self.next_try:
                    where = f"tracking server {self.tracking_uri}"
                    print(f"{where} unreachable ({err}); training goes on, its metrics held "
                          "until the server is back", flush=True)  # fmt: skip
                self.next_try = time.monotonic() + self.retry_s
                return False
            self.held.pop(0)
        if self.next_try:
            print(f"tracking server {self.tracking_uri} back: held metrics sent", flush=True)
            self.next_try = 0.0
        return True

    def write_held(self, unsent: Path) -> int:
        """Appends the held batches to ``unsent`` (one JSON line each); how many."""
        count = len(self.held)
        if self.held:
            unsent.parent.mkdir(parents=True, exist_ok=True)
            with unsent.open("a") as file:
                file.write("".join(batch_json(b) + "\n" for b in self.held))
        self.held = []
        return count

    def how_to_send(self, unsent: Path) -> str:
        return f"python -m pipelines.tracking {unsent} --tracking_uri {self.tracking_uri}"

    def wait_and_send(self, patience_s: float, unsent: Path) -> None:
        """Sends what is held, trying for up to ``patience_s``; past it, the batches go to
        ``unsent`` and ``TrackingError`` says how to send them."""
        give_up = time.monotonic() + patience_s
        while not self.send_held(now=True):
            if time.monotonic() >= give_up:
                count = self.write_held(unsent)
                raise TrackingError(
                    f"tracking server {self.tracking_uri} unreachable for {patience_s:g} s "
                    f"after training: {count} batches of the run's metrics are in {unsent} "
                    "(its checkpoints are beside it; the run is left RUNNING, its best model "
                    "not logged); when the server is back, send them with: "
                    f"{self.how_to_send(unsent)}"
                )
            time.sleep(min(self.retry_s, max(0.0, give_up - time.monotonic())))


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Holds a lock beside a SQLite store while a client opens it: a new store creates and
    migrates its tables on first use, and ranks started together (torchrun) must not race."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///") + ".lock")
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger with the project's tracking URI and model logging on.

    Args:
        experiment_name: MLflow experiment.
        run_name: MLflow run name (MLflow picks one if empty).
        tracking_uri: overrides ``MLFLOW_TRACKING_URI`` and the SQLite default.
        log_model: log the best checkpoint as a run artifact at the end of training.
        checkpoint_dir: where checkpoints are written locally before they are logged.
        run_id: continue this run instead of starting one (set by ``ranker fit --ckpt_path``
            from the checkpoint's run).
        outage_retry_seconds: while the tracking server is away, how often held metrics are
            tried again (training goes on meanwhile).
        outage_patience_seconds: how long the end of training waits for an absent tracking
            server before it writes the unsent metrics to a file and stops with the command
            that sends them.
    """

    def __init__(
        self,
        experiment_name: str = "ranker",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        log_model: bool = True,
        checkpoint_dir: str = "checkpoints",
        run_id: str | None = None,
        outage_retry_seconds: float = 30.0,
        outage_patience_seconds: float = 600.0,
        **kwargs: Any,
    ) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        with _store_lock(self.tracking_uri):
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=self.tracking_uri,
                log_model=log_model,
                run_id=run_id,
                **kwargs,
            )
        self.checkpoint_dir = checkpoint_dir
        self.patience_s, self.gave_up = outage_patience_seconds, False
        self._mlflow_client = HoldingClient(self.tracking_uri, outage_retry_seconds)

    @property
    def save_dir(self) -> str:
        # Lightning puts checkpoints under save_dir/<experiment id>/<run id>/; MLflow's own
        # answer is None for a non-file store, which would scatter them over the working dir.
        return self.checkpoint_dir

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        # Checkpoints kept only to resume from (save_top_k=0, save_last) stay local; the run
        # logs its best model.
        if checkpoint_callback.save_top_k != 0:
            super().after_save_checkpoint(checkpoint_callback)

    def finalize(self, status: str = "success") -> None:
        if self.gave_up:  # the server is away, the unsent metrics are in a file already
            return
        unsent = None
        if self._initialized and self.run_id is not None:
            unsent = Path(self.save_dir) / self.experiment_id / self.run_id / "unsent.jsonl"
        client = self._mlflow_client
        if status == "finished":
            # Only Lightning's SLURM requeue handler says "finished", from inside a signal
            # handler that may have interrupted this process's own write to the store: it
            # sends nothing (SQLite would stay locked against it and the job crash). Held
            # batches of a server known to be away go to the file; the run is not over either:
            # the requeued job continues it.
            if unsent is not None and client.next_try and not client.sending:
                self._report_unsent(unsent)
            return
        if status == "failed" and unsent is not None and not client.send_held(True):
            self._report_unsent(unsent)  # a crash: no waiting, its own error is the one reported
            self.gave_up = True
        if self.gave_up:
            return
        if unsent is not None:
            try:
                client.wait_and_send(self.patience_s, unsent)
            except TrackingError:
                self.gave_up = True
                raise
        super().finalize(status)

    def _report_unsent(self, unsent: Path) -> None:
        client = self._mlflow_client
        count = client.write_held(unsent)
        print(f"ranker: {count} batches of metrics not sent are in {unsent}; send them "
              f"with: {client.how_to_send(unsent)}", flush=True)  # fmt: skip


def send(unsent: Path, tracking_uri: str | None = None) -> None:
    """Sends the batches a run could not send (``unsent.jsonl``), in order."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    lines = [line for line in unsent.read_text().splitlines() if line.strip()]
    for line in lines:
        client.log_batch(**batch_of(line))
    print(f"{len(lines)} batches sent to {client.tracking_uri}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="send a run's unsent metrics")
    parser.add_argument("unsent", type=Path)
    parser.add_argument("--tracking_uri", default=None)
    options = parser.parse_args()
    send(options.unsent, options.tracking_uri)
