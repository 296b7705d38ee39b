"""Small inputs and tasks the model tests share: two task groups, tiny experts."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import yaml

from features.config import TaskSpec
from features.datamodule import TensorBatch
from features.state import InputSpec, SequenceInput
from ranker.diagnostics import ExpertStats
from ranker.models.base import MultiTaskModel
from ranker.scoring import score

INPUTS = InputSpec(("user", "item", "hour"), (40, 60, 24), (8, 8, 4), ("age", "duration"))
TASKS = (
    TaskSpec("click", "click", "watch"),
    TaskSpec("long_view", "long_view", "watch"),
    TaskSpec("like", "like", "interaction"),
    TaskSpec("comment", "comment", "interaction"),
)
SMALL = {"expert_hidden": [16, 8], "tower_hidden": [8]}
SEQ_INPUTS = InputSpec(
    INPUTS.cat_names,
    INPUTS.cardinalities,
    INPUTS.embedding_dims,
    INPUTS.num_names,
    (
        SequenceInput("clicked", "item", 6, "target_attention", "item"),
        SequenceInput("viewed", "item", 4, "mean"),
        # A long history searched (soft: by embedding), and searched by an aligned attribute
        # (hard: the behaviours at the candidate's hour).
        SequenceInput("long", "item", 12, "search", "item", 4),
        SequenceInput("long_hours", "hour", 12, "none"),  # only searched by
        SequenceInput("by_hour", "item", 12, "search", "item", 4, "long_hours"),
    ),
)
ITEM = INPUTS.cat_names.index("item")


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in INPUTS.cardinalities], 1)
    return cat, torch.randn(n, INPUTS.num_numeric, generator=g)


def network_config(path: Path) -> dict:
    """A model config's ``model.network``, as LightningCLI composes it: an ablation in a
    subfolder (``home/flat.yaml``) is stacked after its base (``home.yaml``)."""
    network = yaml.safe_load(path.read_text())["model"]["network"]
    base = path.parent.parent / f"{path.parent.name}.yaml"
    if path.parent.name != "model" and base.exists():
        composed = yaml.safe_load(base.read_text())["model"]["network"]
        composed["init_args"] = {**composed.get("init_args", {}), **network["init_args"]}
        return composed
    return network


def model_configs(root: Path, uplift: bool = False) -> list[Path]:
    """Every ranking model config (the zoo and the ablation overlays); with ``uplift``, every
    uplift model config instead (those need a treatment: ``tests/ranker/test_mtmt.py``)."""
    paths = sorted(root.glob("*.yaml")) + sorted(root.glob("*/*.yaml"))
    return [p for p in paths if network_class(p).models_treatment == uplift]


def network_class(path: Path) -> type:
    module, _, name = network_config(path)["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def config_id(path: Path) -> str:
    """A model config's test id: ``mmoe``, ``home/flat``."""
    return f"{path.parent.name}/{path.stem}" if path.parent.name != "model" else path.stem


def sequences(n: int, seed: int = 0, empty_every: int = 3) -> dict[str, torch.Tensor]:
    """Right-aligned ids with padding; every ``empty_every``-th row has no history."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in SEQ_INPUTS.sequences:
        vocabulary = INPUTS.cardinalities[INPUTS.cat_names.index(spec.vocabulary)]
        ids = torch.randint(1, vocabulary, (n, spec.max_len), generator=g)
        lengths = torch.randint(0, spec.max_len + 1, (n,), generator=g)
        lengths[::empty_every] = 0
        pad = torch.arange(spec.max_len) < (spec.max_len - lengths)[:, None]
        out[spec.name] = ids.masked_fill(pad, 0)
    return out


def expert_stats(
    model: MultiTaskModel,
    batches: list[TensorBatch],
    sample_rows: int = 0,
    max_batches: int | None = None,
) -> ExpertStats:
    """The expert statistics of scoring ``batches`` (as ``ranker evaluate`` gathers them)."""
    stats = ExpertStats(sample_rows=sample_rows)
    score(model, batches, internals=stats.update, max_batches=max_batches)
    return stats
