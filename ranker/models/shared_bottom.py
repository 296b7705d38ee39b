"""Shared-Bottom (Caruana, "Multitask Learning", Machine Learning 1997).

One MLP shared by all tasks, then a tower per task:

    h = f(x),    y_t = sigmoid(tower_t(h))

The baseline every multi-gate model is measured against: all tasks pull the same
representation, which is where negative transfer between unlike tasks comes from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from features.config import TaskSpec
from features.contract import LOGITS
from features.state import InputSpec
from ranker.experts import Internals
from ranker.layers import MLP, RequestSplit, Tower, linear
from ranker.models.base import MultiTaskModel, Outputs


class SharedBottom(MultiTaskModel):
    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        bottom_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(inputs, tasks)
        self.bottom = MLP(self.input_dim, bottom_hidden, activation, dropout)
        self.towers = nn.ModuleList(
            Tower(self.bottom.output_dim, tower_hidden, activation, tower_dropout)
            for _ in self.tasks
        )

    splits_request = True  # the bottom's first layer splits per part

    def head(self, x: torch.Tensor | RequestSplit, internals: Internals | None) -> Outputs:
        h = linear(x, self.bottom[0])
        for layer in list(self.bottom)[1:]:
            h = layer(h)
        if internals is not None:  # the bottom is the one (shared) expert every task uses
            internals.experts["bottom/shared"] = h.unsqueeze(1)
        return {LOGITS: torch.stack([tower(h) for tower in self.towers], dim=1)}
