"""The one signature every model of the zoo has:
``forward(cat [B, F_cat], num [B, F_num], sequences {name: [B, L]}) -> logits [B, T]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import Internals
from ranker.layers import FusedEmbedding, Tower
from ranker.sequence import SequencePooling

Sequences = dict[str, torch.Tensor] | None


class MultiTaskModel(nn.Module):
    """Embeds the inputs once; subclasses map the embedded ``x`` to one logit per task.

    ``x`` is every categorical feature's embedding, the numeric inputs, then each sequence
    pooled (``ranker.sequence``): so every model reads sequences without code of its own.

    ``forward`` is the exported path. ``forward_with_internals`` also returns every expert's
    output and every gate's weights (see ``ranker.experts.Internals``) for diagnostics.
    """

    def __init__(self, inputs: InputSpec, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.inputs = inputs
        self.tasks = tuple(tasks)
        self.embedding = FusedEmbedding(inputs)
        self.pooling = SequencePooling(inputs)

    @property
    def input_dim(self) -> int:
        return self.embedding.output_dim + self.pooling.output_dim

    def embed(self, cat: torch.Tensor, num: torch.Tensor, sequences: Sequences) -> torch.Tensor:
        """The input ``x`` ``[B, input_dim]``."""
        x = self.embedding(cat, num)
        if not self.inputs.sequences:
            return x
        return torch.cat([x, *self.pooling(self.embedding, cat, sequences or {})], dim=1)

    @property
    def task_keys(self) -> list[str]:
        """Representation names of the tasks: ``task:<name>``."""
        return [f"task:{t.name}" for t in self.tasks]

    def forward(
        self, cat: torch.Tensor, num: torch.Tensor, sequences: Sequences = None
    ) -> torch.Tensor:
        return self.head(self.embed(cat, num, sequences), None)

    def forward_with_internals(
        self, cat: torch.Tensor, num: torch.Tensor, sequences: Sequences = None
    ) -> tuple[torch.Tensor, Internals]:
        internals = Internals()
        return self.head(self.embed(cat, num, sequences), internals), internals

    def head(self, x: torch.Tensor, internals: Internals | None) -> torch.Tensor:
        raise NotImplementedError


class ExpertModel(MultiTaskModel):
    """Experts and gates (MMoE, CGC / PLE, AdaTT, HoME): a stack of ``ExpertLayer``s over the
    embedded ``x``, then one tower per task on the representation ``task:<name>``.

    Subclasses append their layers to ``self.layers`` and call ``add_towers``.
    """

    def __init__(self, inputs: InputSpec, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(inputs, tasks)
        self.layers = nn.ModuleList()

    def add_towers(self, hidden: Sequence[int], activation: str, dropout: float = 0.0) -> None:
        """One tower per task; ``dropout`` after each of its hidden layers (training only)."""
        width = self.layers[-1].output_dim
        self.towers = nn.ModuleList(Tower(width, hidden, activation, dropout) for _ in self.tasks)

    def head(self, x: torch.Tensor, internals: Internals | None) -> torch.Tensor:
        reps = {"x": x}
        for layer in self.layers:
            reps = layer(reps, internals)
        logits = [tower(reps[k]) for k, tower in zip(self.task_keys, self.towers, strict=True)]
        return torch.stack(logits, dim=1)
