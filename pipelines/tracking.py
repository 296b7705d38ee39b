"""MLflow wiring: one place decides where runs go.

The embedded default is a SQLite store in the working directory; ``MLFLOW_TRACKING_URI``
points everything at a real ``mlflow server`` instead. Lightning's own default (a ``./mlruns``
file store) is refused by current MLflow, so the URI is always passed explicitly.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from features.contract import resolve_tracking_uri


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
    """

    def __init__(
        self,
        experiment_name: str = "ranker",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        log_model: bool = True,
        checkpoint_dir: str = "checkpoints",
        run_id: str | None = None,
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
        if status == "finished":
            # Only Lightning's SLURM requeue handler says "finished", from inside a signal
            # handler that may have interrupted this process's own write to the store (SQLite
            # then stays locked against it: the job crashed). The run is not over either: the
            # requeued job continues it.
            return
        super().finalize(status)
