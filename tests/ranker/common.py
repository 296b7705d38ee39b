"""Small inputs and tasks the model tests share: two task groups, tiny experts."""

from __future__ import annotations

import torch

from features.config import TaskSpec
from features.state import InputSpec

INPUTS = InputSpec(("user", "item", "hour"), (40, 60, 24), (8, 8, 4), ("age", "duration"))
TASKS = (
    TaskSpec("click", "click", "watch"),
    TaskSpec("long_view", "long_view", "watch"),
    TaskSpec("like", "like", "interaction"),
    TaskSpec("comment", "comment", "interaction"),
)
SMALL = {"expert_hidden": [16, 8], "tower_hidden": [8]}


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in INPUTS.cardinalities], 1)
    return cat, torch.randn(n, INPUTS.num_numeric, generator=g)
