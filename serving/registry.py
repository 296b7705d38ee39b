"""Where a served model comes from: a local ``.onnx`` file or the MLflow model registry.

``models:/<name>@<alias>`` (followed by hot reload) or ``models:/<name>/<version>``. A
registered version's feature tables are the ``serving/`` artifacts of the run that exported it;
a local file's are the ``user_features.parquet`` / ``item_features.parquet`` beside it. Tables
given on the command line win.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from features.contract import (
    ITEM_TABLE,
    OPTIMIZED_GRAPH,
    USER_TABLE,
    optimized_path,
    parse_model_uri,
    resolve_tracking_uri,
)
from serving.model import ModelError, Scorer

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from serving.core.config import Settings

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """``features.contract.parse_model_uri``, a ``ModelError`` when it is neither form."""
    try:
        return parse_model_uri(uri)
    except ValueError as err:
        raise ModelError(str(err)) from None


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow.tracking import MlflowClient  # only registry models need mlflow

    return MlflowClient(resolve_tracking_uri(tracking_uri))


def resolve_version(model: str, tracking_uri: str | None) -> str:
    """The version a model reference points at now (``local`` for a file)."""
    if not model.startswith("models:/"):
        return "local"
    from mlflow.exceptions import MlflowException

    name, alias, version = parse(model)
    client = _client(tracking_uri)
    try:
        if alias:
            return str(client.get_model_version_by_alias(name, alias).version)
        return str(client.get_model_version(name, version).version)
    except MlflowException as err:
        raise ModelError(f"cannot resolve {model}: {err.message}") from None


def load_scorer(settings: Settings, threads: int | None, version: str | None = None) -> Scorer:
    """The model and its feature tables, in memory. A registered version is downloaded to a
    temporary directory that is removed once loaded (or once the load fails): the session and
    the tables need no file afterwards, so reloads leave nothing behind."""
    model = settings.model
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"no model file at {path}")
        user = settings.user_table or _beside(path, USER_TABLE)
        item = settings.item_table or _beside(path, ITEM_TABLE)
        optimized = optimized_path(path)
        return Scorer(path, path.stem, "local", str(path), threads, user, item, optimized)
    name, _, _ = parse(model)
    version = version or resolve_version(model, settings.tracking_uri)
    with tempfile.TemporaryDirectory(prefix=f"ranker-{name}-{version}-") as target:
        graph, files = _download(name, version, settings.tracking_uri, Path(target))
        return Scorer(
            graph,
            name,
            version,
            f"models:/{name}/{version}",
            threads,
            settings.user_table or files[USER_TABLE],
            settings.item_table or files[ITEM_TABLE],
            files[OPTIMIZED_GRAPH],
        )


def _download(
    name: str, version: str, tracking_uri: str | None, target: Path
) -> tuple[Path, dict[str, Path | None]]:
    """A registered version's graph, and the feature tables and optimised graph of the run that
    exported it (``None`` for any it lacks)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}",
            dst_path=str(target / "model"),
            tracking_uri=client.tracking_uri,
        )
        graphs = sorted(Path(local).rglob("*.onnx"))
        if not graphs:
            raise ModelError(f"models:/{name}/{version} holds no .onnx file")
        run_id = client.get_model_version(name, version).run_id
        files: dict[str, Path | None] = {}
        for file in (USER_TABLE, ITEM_TABLE, OPTIMIZED_GRAPH):
            try:
                files[file] = Path(
                    client.download_artifacts(run_id, f"serving/{file}", str(target))
                )
            except (MlflowException, OSError):
                files[file] = None
    except MlflowException as err:
        raise ModelError(f"cannot download models:/{name}/{version}: {err.message}") from None
    return graphs[0], files


def _beside(path: Path, name: str) -> Path | None:
    candidate = path.parent / name
    return candidate if candidate.exists() else None
