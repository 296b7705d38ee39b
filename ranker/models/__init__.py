"""The model zoo. Every model has one signature (``ranker.models.base``):

``forward(cat [B, F_cat], num [B, F_num], sequences {name: [B, L]}, treatment [B] | None)
-> {"logits": [B, T], ...}`` (the treatment: uplift data only; ``ranker.models.mtmt``)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from features.config import TaskSpec
from features.state import InputSpec
from ranker.models.adatt import AdaTT
from ranker.models.aw_moe import AWMoE
from ranker.models.base import MultiTaskModel
from ranker.models.home import HoME
from ranker.models.mmoe import MMoE
from ranker.models.mtmt import MTMT, ArmHeads
from ranker.models.ple import PLE
from ranker.models.shared_bottom import SharedBottom

__all__ = [
    "MTMT",
    "PLE",
    "AWMoE",
    "AdaTT",
    "ArmHeads",
    "HoME",
    "MMoE",
    "MultiTaskModel",
    "SharedBottom",
    "build",
]


def build(
    network: Mapping[str, Any], inputs: InputSpec, tasks: Sequence[TaskSpec], **overrides: Any
) -> MultiTaskModel:
    """The model a ``model.network`` config block (``class_path`` + ``init_args``) describes,
    as LightningCLI builds it, for code that has no CLI (benchmarks, tests, loading)."""
    module, _, name = network["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(inputs, tasks, **{**network.get("init_args", {}), **overrides})
