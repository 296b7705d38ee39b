"""The one signature every model of the zoo has: ``forward(cat, num) -> logits [B, T]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from features.config import TaskSpec
from features.state import InputSpec
from ranker.layers import FusedEmbedding


class MultiTaskModel(nn.Module):
    """Embeds the inputs once; subclasses map the embedded ``x`` to one logit per task."""

    def __init__(self, inputs: InputSpec, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.inputs = inputs
        self.tasks = tuple(tasks)
        self.embedding = FusedEmbedding(inputs)

    @property
    def input_dim(self) -> int:
        return self.embedding.output_dim

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(cat, num))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
