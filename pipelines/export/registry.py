"""A checked graph into the MLflow model registry (``log_and_register``), and ``ranker
promote``: an alias (``models:/<name>@<alias>``) moved to a registered version."""

from __future__ import annotations

import mlflow
import onnx
import onnxruntime as ort
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from features.datamodule import RankerDataModule
from features.onnx_graph import raw_feeds, raw_inputs
from pipelines.checkpoints import RunError
from pipelines.export.optimize import AucChange, GraphChoice
from pipelines.export.parity import Parity, parity_rows
from pipelines.render import wide_console
from pipelines.tracking import resolve_tracking_uri


def log_and_register(
    client: MlflowClient,
    run_id: str,
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    data: RankerDataModule,
    name: str,
    parity: Parity,
    change: AucChange | None = None,
    choice: GraphChoice | None = None,
) -> tuple[str, str]:
    """Log with the ONNX flavour (signature, input example) and register a new version."""
    inputs = raw_inputs(data.state, data.config.features)
    example_frame = parity_rows(data, 3)
    example = raw_feeds(example_frame, inputs)
    names = [o.name for o in session.get_outputs()]  # every named output, ``OUTPUT`` first
    signature = infer_signature(example, dict(zip(names, session.run(names, example), strict=True)))
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                model,
                name="onnx",
                signature=signature,
                input_example=example,
                registered_model_name=name,
                onnx_execution_providers=["CPUExecutionProvider"],
            )
            mlflow.log_metrics(
                {
                    "export/parity_rows": parity.rows,
                    "export/parity_max_abs_diff": parity.max_abs_diff,
                    "export/parity_mean_abs_diff": parity.mean_abs_diff,
                    "export/parity_topk_ties": parity.ties,
                    **{
                        f"export/int8_auc_change/{task}": delta
                        for task, delta in (change.change.items() if change else ())
                    },
                    **(request_ms(choice) if choice else {}),
                }
            )
    except MlflowException as err:
        raise RunError(f"could not log or register the model: {err.message}") from None
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "run_id", run_id)
    return version, f"models:/{name}/{version}"


def request_ms(choice: GraphChoice) -> dict[str, float]:
    """``--quantize auto``'s timings as metrics."""
    timed = {"float32": choice.float_ms, "int8": choice.int8_ms}
    return {f"export/request_ms/{k}": v for k, v in timed.items() if v is not None}


def promote(
    *,
    name: str,
    alias: str = "champion",
    version: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Point an alias (``models:/<name>@<alias>``) at a registered version.

    Args:
        name: registered model name.
        alias: the alias to move.
        version: the version (default: the latest).
        tracking_uri: MLflow store (default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
    """
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        raise RunError(f"cannot read registered model '{name}': {err.message}") from None
    if not versions:
        raise RunError(f"no registered model '{name}' in {client.tracking_uri}")
    known = sorted(int(v.version) for v in versions)
    chosen = version or str(known[-1])
    if not chosen.isdigit() or int(chosen) not in known:
        raise RunError(f"'{name}' has no version {chosen} (versions: {known})")
    client.set_registered_model_alias(name, alias, chosen)
    wide_console().print(f"models:/{name}@{alias} -> version {chosen}")
    return chosen
