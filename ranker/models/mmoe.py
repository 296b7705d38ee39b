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

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertLayer, GateSpec, PoolSpec
from ranker.models.base import ExpertModel


class MMoE(ExpertModel):
    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__(inputs, tasks)
        self.layers.append(
            ExpertLayer(
                "mmoe",
                pools=[PoolSpec("shared", ("x",), num_experts)],
                gates=[GateSpec(key, ("x",), ("shared",)) for key in self.task_keys],
                input_dims={"x": self.input_dim},
                expert_hidden=expert_hidden,
                activation=activation,
            )
        )
        self.add_towers(tower_hidden, activation, tower_dropout)
