"""``ranker fit --warm_start <run id | checkpoint | models:/name@alias | models:/name/N>``:
tomorrow's model starts from today's.

The parent's FeatureState goes to the DataModule (``parent_state``): its vocabularies grow
with the new window's ids (``features.state.grown``), its numeric statistics are kept. Once the
new model is built, it takes the parent's weights: every parameter as it was, and each
embedding row by id, so an id the parent knew keeps its vector and a new id starts as the
table initialises it (``copy_weights``). The parent's optimiser state follows the same map
(``CarryOptimizerState``). The run is tagged with its parent (``TAG_PARENT_RUN``,
``TAG_WARM_START``): the lineage shows in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features.contract import parse_model_uri
from features.state import FeatureState
from pipelines.checkpoints import Loaded, RunError, load_model, locate, read_checkpoint
from ranker.module import RankerModule

TAG_PARENT_RUN = "warm_start.parent_run"  # the parent's MLflow run id
TAG_WARM_START = "warm_start.from"  # what the user named (a models:/ URI, a path, a run id)


@dataclass
class Parent:
    """A warm start's parent: its model, FeatureState, run and training checkpoint."""

    reference: str
    loaded: Loaded
    run_id: str | None
    checkpoint: dict[str, Any]  # its optimiser states among the rest


def _registered_run(reference: str, client: MlflowClient) -> str:
    """``models:/name@alias`` or ``models:/name/N`` -> the version's run id."""
    try:
        name, alias, version = parse_model_uri(reference)
    except ValueError as err:
        raise RunError(str(err)) from None
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as err:
        raise RunError(
            f"{reference}: not in the model registry of the tracking store {client.tracking_uri} "
            f"({err.message.splitlines()[0]})"
        ) from None
    if not found.run_id:
        raise RunError(f"{reference} (version {found.version}) names no run to start from")
    return found.run_id


def resolve(reference: str, client: MlflowClient, download: Path) -> Parent:
    """The parent a user named, downloaded into ``download``."""
    ref = _registered_run(reference, client) if reference.startswith("models:/") else reference
    located = locate(ref, client, download)
    loaded = load_model(located, client, download)
    checkpoint = read_checkpoint(located.path, located.origin)
    return Parent(reference, loaded, located.run_id, checkpoint)


def save_state(parent: Parent, directory: Path) -> str:
    """The parent's FeatureState where the DataModule reads it (``--data.parent_state``)."""
    parent.loaded.state.save(directory)
    return str(directory)


# -- the weights ----------------------------------------------------------------------------


def table_rows(
    child: RankerModule, parent: RankerModule, maps: list[np.ndarray]
) -> list[torch.Tensor]:
    """Per embedding table of ``child``, the parent's row of each of its rows (-1: none), from
    the per-feature index maps of ``FeatureState.rows_from`` (widths matched: ``check_inputs``)."""
    new, old = child.network.embedding, parent.network.embedding
    rows = [torch.full((t.num_embeddings,), -1, dtype=torch.long) for t in new.tables]
    for f, index in enumerate(maps):
        (table, start), (_, old_start) = new.rows_of[f], old.rows_of[f]
        source = torch.from_numpy(index)
        rows[table][start : start + len(index)] = torch.where(source >= 0, source + old_start, -1)
    return rows


def check_inputs(child: RankerModule, parent: RankerModule) -> None:
    """The same features at the same widths, and the same network shapes: else one error
    naming every difference."""
    problems = []
    then = dict(zip(parent.inputs.cat_names, parent.inputs.embedding_dims, strict=True))
    for name, width in zip(child.inputs.cat_names, child.inputs.embedding_dims, strict=True):
        if then.get(name, width) != width:
            problems.append(
                f"feature '{name}' has embedding_dim {width} here, {then[name]} in the parent"
            )
    if not problems:
        kinds = type(child.network).__name__, type(parent.network).__name__
        if kinds[0] != kinds[1]:
            problems.append(f"the network is {kinds[0]} here, {kinds[1]} in the parent")
        old = parent.state_dict()
        for key, value in child.state_dict().items():
            if key not in old:
                problems.append(f"{key} is not in the parent")
            elif ".embedding.tables." not in key and old[key].shape != value.shape:
                shapes = tuple(value.shape), tuple(old[key].shape)
                problems.append(f"{key} has shape {shapes[0]} here, {shapes[1]} in the parent")
    if problems:
        shown = "; ".join(problems[:8]) + (
            f"; and {len(problems) - 8} more" if problems[8:] else ""
        )
        raise RunError(f"warm start: this model does not match the parent's: {shown}")


@torch.no_grad()
def copy_weights(child: RankerModule, parent: RankerModule, rows: list[torch.Tensor]) -> None:
    """``child`` takes every parameter and buffer of ``parent``, embedding rows by ``rows``
    (new rows keep their initial values)."""
    child.network.embedding.initialise()  # tables built to be sharded are not written yet
    old = parent.state_dict()
    tables = {f"network.embedding.tables.{t}.weight": t for t in range(len(rows))}
    for key, value in child.state_dict().items():
        if key == "task_weights":
            continue  # the dataset's, as configured now
        if key not in tables:
            value.copy_(old[key])
            continue
        source = rows[tables[key]]
        known = source >= 0
        value[known] = old[key][source[known]]


class CarryOptimizerState(Callback):
    """At the start of training, the parent's optimiser states, the embedding optimiser's
    per-row moments moved with their rows (new rows start at zero, as a fresh optimiser's)."""

    def __init__(self, states: list[dict[str, Any]], rows: list[torch.Tensor]) -> None:
        self.states, self.rows = states, rows

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.optimizers
        if getattr(pl_module, "sharded", False) or len(self.states) < 2:
            # Tables sharded here or in the parent (whose checkpoint keeps the dense state).
            optimizers, states = optimizers[:1], self.states[:1]
            print("warm start: the tables' optimiser state starts fresh (sharded tables)")
        else:
            states = self.states
        counts = [[len(g["params"]) for g in s["param_groups"]] for s in states]
        if counts != [[len(g["params"]) for g in o.param_groups] for o in optimizers]:
            print("warm start: the optimisers differ from the parent's; they start fresh")
            return
        carried = [states[0]["state"]]
        if len(states) > 1:
            carried.append(self.moved(states[1]["state"]))
        # The moments carried; the hyper-parameters (learning rates) are this run's own.
        for optimizer, state in zip(optimizers, carried, strict=True):
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": state, "param_groups": groups})

    def moved(self, states: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """The embedding optimiser's per-row state moved with its rows."""
        moved: dict[int, dict[str, Any]] = {}
        for index, entry in states.items():
            source = self.rows[int(index)]
            known = source >= 0
            moved[index] = {}
            for name, value in entry.items():
                if not torch.is_tensor(value) or value.dim() == 0:
                    moved[index][name] = value  # the step count
                    continue
                out = torch.zeros((len(source), *value.shape[1:]), dtype=value.dtype)
                out[known] = value[source[known]]
                moved[index][name] = out
        return moved


def take_weights(child: RankerModule, parent: Loaded, state: FeatureState) -> list[torch.Tensor]:
    """``child`` (built on ``state``, grown from ``parent.state``) checked against the parent
    and given its weights; the embedding tables' row maps, for the optimiser state."""
    check_inputs(child, parent.module)
    rows = table_rows(child, parent.module, state.rows_from(parent.state))
    copy_weights(child, parent.module, rows)
    return rows


def warm_start(trainer: Trainer, child: RankerModule, parent: Parent, state: FeatureState) -> None:
    """Everything after the new model is built: check it against the parent, take its
    weights, queue its optimiser state, tag the run."""
    rows = take_weights(child, parent.loaded, state)
    states = parent.checkpoint.get("optimizer_states") or []
    if states:
        trainer.callbacks.append(CarryOptimizerState(states, rows))
    logger = trainer.logger
    if logger is not None and hasattr(logger, "run_id"):
        client = logger.experiment
        client.set_tag(logger.run_id, TAG_WARM_START, parent.reference)
        if parent.run_id:
            client.set_tag(logger.run_id, TAG_PARENT_RUN, parent.run_id)
