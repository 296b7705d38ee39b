"""From what a user names (an MLflow run id or a checkpoint path) to a loaded model and data.

A checkpoint is self-contained: the model's weights and hyper-parameters, the FeatureState it
was trained with (saved by the DataModule), the absolute paths of its dataset config and log,
and its MLflow run id. Runs are found in the current tracking store; their best checkpoint is
the ``.ckpt`` artifact Lightning's MLflow logger wrote (aliased ``best``).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.environments import SLURMEnvironment
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features.config import ConfigError
from features.datamodule import RankerDataModule
from features.state import FeatureState
from ranker.module import RankerModule

# Downloads are a checkpoint or a small file: no progress bars in the commands' output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class RunError(ConfigError):
    """A run or checkpoint that cannot be used as asked (reported like a config error, exit 2)."""


@dataclass
class Located:
    """A checkpoint on local disk, and its MLflow run in the current store (if it has one)."""

    label: str
    path: Path
    run_id: str | None
    origin: str  # where the checkpoint came from: the path given, or runs:/<id>/<artifact>


def find_run(client: MlflowClient, run_id: str) -> Any | None:
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _checkpoint_artifact(client: MlflowClient, run_id: str, download: Path) -> str | None:
    """Artifact path of the run's best checkpoint (Lightning logs ``<stem>/<stem>.ckpt``)."""
    found: list[str] = []
    for entry in client.list_artifacts(run_id):
        if entry.is_dir:
            found += [f.path for f in client.list_artifacts(run_id, entry.path)]
        found.append(entry.path)
    checkpoints = sorted(p for p in found if p.endswith(".ckpt"))
    if len(checkpoints) <= 1:
        return checkpoints[0] if checkpoints else None
    for path in checkpoints:  # several: the one Lightning aliased "best"
        aliases = str(Path(path).parent / "aliases.txt")
        if aliases in found:
            local = client.download_artifacts(run_id, aliases, str(download))
            if "best" in Path(local).read_text():
                return path
    return checkpoints[-1]


def locate(ref: str, client: MlflowClient, download: Path) -> Located:
    """A checkpoint path or an MLflow run id -> a local checkpoint file and its run."""
    path = Path(ref)
    if path.is_file():
        return Located(ref, path, None, ref)  # its run, if any, is read from the checkpoint
    if path.is_dir():
        raise RunError(f"{ref} is a directory; give a .ckpt file or an MLflow run id")
    if ref.endswith(".ckpt") or "/" in ref or "\\" in ref:
        raise RunError(f"no checkpoint file at {ref}")
    if find_run(client, ref) is None:
        raise RunError(
            f"no MLflow run '{ref}' in the tracking store {client.tracking_uri} "
            "(set MLFLOW_TRACKING_URI or --tracking_uri to the store that holds it)"
        )
    artifact = _checkpoint_artifact(client, ref, download)
    if artifact is None:
        raise RunError(
            f"MLflow run '{ref}' has no checkpoint artifact (did training finish, with the "
            "logger's log_model on?)"
        )
    local = Path(client.download_artifacts(ref, artifact, str(download)))
    return Located(ref, local, ref, f"runs:/{ref}/{artifact}")


def read_checkpoint(path: str | Path, origin: str | None = None) -> dict[str, Any]:
    """A ranker training checkpoint's contents (tensors memory-mapped, nothing unsafe run)."""
    origin = origin or str(path)
    if not Path(path).is_file():
        raise RunError(f"no checkpoint file at {origin}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # not a zip / pickle torch can read safely
        raise RunError(f"{origin} is not a readable checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise RunError(f"{origin} is not a ranker training checkpoint")
    return checkpoint


class CheckpointWriteError(RunError):
    """A checkpoint that could not be written (a full disk, a quota): the previous one is
    intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on a local disk: the checkpoint is written to a
    temporary file beside its destination, synced, then renamed over it. A write that fails
    (a full disk) leaves the previous checkpoint as it was and no partial file, and stops the
    run with a ``CheckpointWriteError`` naming the file.

    Lightning writes through fsspec, whose local "transaction" stages the file in the system
    temporary directory and *copies* it over the destination when that is another disk: a
    failure during the copy truncates the previous checkpoint. Remote paths (``s3://``...)
    are written as Lightning writes them."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = io.BytesIO()  # serialised first: torch.save turns a failed write into a
        torch.save(checkpoint, data)  # RuntimeError of its zip writer, naming nothing
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                os.fchmod(file.fileno(), 0o666 & ~umask())  # as open() would (mkstemp: 0600)
                file.write(data.getbuffer())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
        except BaseException as err:
            Path(temp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise CheckpointWriteError(
                    f"could not write checkpoint {path}: {err.strerror or err}; the previous "
                    "checkpoint there (if any) is intact"
                ) from err
            raise


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The trainer's plugins with ``AtomicCheckpointIO`` added, unless one writes checkpoints
    already."""
    given = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in given):
        return given
    return [*given, AtomicCheckpointIO()]


def requeued_checkpoint(root: str | Path | None) -> Path | None:
    """Under SLURM, the newest checkpoint Lightning saved when the job was told to requeue
    (``hpc_ckpt_<n>.ckpt`` in the trainer's root directory), which a restarted job resumes
    from; None elsewhere or when there is none."""
    if not SLURMEnvironment.detect():
        return None
    saved = {
        int(match.group(1)): path
        for path in Path(root or os.getcwd()).glob("hpc_ckpt_*.ckpt")
        if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name))
    }
    return saved[max(saved)] if saved else None


# Under torchrun, rank 0 writes this file (in the trainer's root directory) when training
# starts: the MLflow run and where its last checkpoint goes. The workers torchrun starts again
# after one failed (``--max-restarts``; ``TORCHELASTIC_RESTART_COUNT`` > 0) read it and resume.
ELASTIC_MARK = "torchelastic-{}.json"


def elastic_mark(root: str | Path | None) -> Path | None:
    """The mark of this torchrun job (None outside torchrun)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if job is None else Path(root or os.getcwd()) / ELASTIC_MARK.format(job)


def restarted_run(root: str | Path | None) -> tuple[Path | None, str] | None:
    """Under torchrun after a restart: the first attempt's last checkpoint (None when it died
    before writing one) and its MLflow run; None on a first attempt (which removes an earlier
    job's mark: torchrun's rendezvous id defaults to "none") or outside torchrun."""
    mark = elastic_mark(root)
    if mark is None:
        return None
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < 1:
        mark.unlink(missing_ok=True)  # an earlier job's (the rendezvous id can repeat)
        return None
    if not mark.exists():
        return None
    saved = json.loads(mark.read_text())
    last = Path(saved["last"])
    return (last if last.exists() else None), saved["run_id"]


class ElasticMark(Callback):
    """Writes the torchrun job's mark (``ELASTIC_MARK``) on rank 0 when training starts."""

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        mark = elastic_mark(trainer.default_root_dir)
        run_id = getattr(trainer.logger, "run_id", None)
        lasts = [c for c in trainer.checkpoint_callbacks if c.save_last]
        if mark is None or not trainer.is_global_zero or run_id is None or not lasts:
            return
        last = Path(lasts[0].dirpath) / f"{lasts[0].CHECKPOINT_NAME_LAST}{lasts[0].FILE_EXTENSION}"
        temp = mark.with_suffix(".part")
        temp.write_text(json.dumps({"run_id": run_id, "last": str(last.resolve())}))
        temp.replace(mark)


def checkpoint_run(path: str | Path) -> str | None:
    """The MLflow run id a training checkpoint was written by (None for a checkpoint without)."""
    meta = read_checkpoint(path).get("mlflow")
    return meta["run_id"] if meta else None


# -- loading the model and its data -------------------------------------------------------------


@dataclass
class Loaded:
    """A trained model and what scoring with it needs, without reading its log."""

    module: RankerModule
    state: FeatureState
    dataset: str  # its dataset config
    log_path: str | None  # the log it was trained on, when the checkpoint names one


def load_model(
    located: Located, client: MlflowClient, download: Path, dataset: str | None = None
) -> Loaded:
    """The model in eval mode, its FeatureState and dataset config."""
    checkpoint = read_checkpoint(located.path, located.origin)
    meta = checkpoint.get("mlflow")
    if located.run_id is None and meta and find_run(client, meta["run_id"]):
        located.run_id = meta["run_id"]
    module = RankerModule.load_from_checkpoint(located.path, map_location="cpu").eval()
    saved = checkpoint.get("RankerDataModule", {})
    hparams = checkpoint.get("datamodule_hyper_parameters", {})
    dataset = dataset or saved.get("dataset") or hparams.get("dataset")
    if not dataset:
        raise RunError(f"{located.label}: the checkpoint names no dataset; pass --dataset")
    if "feature_state" in saved:
        state = FeatureState.from_dict(saved["feature_state"])
    elif located.run_id:  # checkpoints written before the state was embedded
        local = client.download_artifacts(located.run_id, "feature_state", str(download))
        state = FeatureState.load(local)
    else:
        raise RunError(
            f"{located.path} carries no FeatureState and has no MLflow run to fetch it from"
        )
    return Loaded(module, state, dataset, saved.get("log_path") or hparams.get("log_path"))


def load(
    located: Located,
    client: MlflowClient,
    download: Path,
    dataset: str | None = None,
    log_path: str | None = None,
    batch_size: int = 2048,
) -> tuple[RankerModule, RankerDataModule]:
    """The model in eval mode and a DataModule scoring with the model's own FeatureState."""
    loaded = load_model(located, client, download, dataset)
    module = loaded.module
    data = RankerDataModule(
        loaded.dataset, log_path=log_path or loaded.log_path, eval_batch_size=batch_size
    )
    trained = [(t.name, t.label) for t in module.tasks]
    defined = [(t.name, t.label) for t in data.tasks]
    if trained != defined:
        raise RunError(
            f"{located.label} was trained on tasks {trained}, but {data.config.source} defines "
            f"{defined}"
        )
    data.use_state(loaded.state)
    return module, data
