"""MMoE (Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018).

Shared experts f_1..f_E, one softmax gate per task (eq. 5-7 of the paper):

    g_t(x) = softmax(W_t x)                       # [E]
    h_t    = sum_e g_t(x)_e * f_e(x)
    y_t    = sigmoid(tower_t(h_t))

Each task weighs the same experts its own way, so unlike tasks can use different experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from features.config import TaskSpec
from features.state import InputSpec
from ranker.layers import MLP, Gate, Tower, mix
from ranker.models.base import MultiTaskModel


class MMoE(MultiTaskModel):
    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(inputs, tasks)
        self.experts = nn.ModuleList(
            MLP(self.input_dim, expert_hidden, activation, dropout) for _ in range(num_experts)
        )
        expert_dim = self.experts[0].output_dim
        self.gates = nn.ModuleList(Gate(self.input_dim, num_experts) for _ in self.tasks)
        self.towers = nn.ModuleList(Tower(expert_dim, tower_hidden, activation) for _ in self.tasks)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, D]
        logits = [
            tower(mix(gate(x), experts))
            for gate, tower in zip(self.gates, self.towers, strict=True)
        ]
        return torch.stack(logits, dim=1)
