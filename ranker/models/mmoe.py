"""MMoE (Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018).

Shared experts f_1..f_E, one softmax gate per task (eq. 5-7 of the paper):

    g_t(x) = softmax(W_t x)                       # [E]
    h_t    = sum_e g_t(x)_e * f_e(x)
    y_t    = sigmoid(tower_t(h_t))

Each task weighs the same experts its own way, so unlike tasks can use different experts.

DeepSeekMoE's options (``ranker.experts.Routing``; Dai et al., arXiv 2401.06066) make it a
fine-grained top-k MoE: ``routing: {granularity: m, top_k: k, balance: alpha}`` and
``always_on_experts`` (DeepSeekMoE's shared experts) added beside the routed mixture,

    h_t = sum_{s in shared} f_s(x) + sum_{e in top-k(g_t(x))} g~_t(x)_e f_e(x)

(``g~`` the top-k weights renormalised; ``configs/model/mmoe_topk.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertLayer, GateSpec, PoolSpec, Routing
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
        always_on_experts: int = 0,
        routing: Routing | None = None,
    ) -> None:
        super().__init__(inputs, tasks)
        pools = [PoolSpec("shared", ("x",), num_experts)]
        always: tuple[str, ...] = ()
        if always_on_experts:
            pools.append(PoolSpec("always", ("x",), always_on_experts))
            always = ("always",)
        self.layers.append(
            ExpertLayer(
                "mmoe",
                pools=pools,
                gates=[GateSpec(key, ("x",), ("shared",), always=always) for key in self.task_keys],
                input_dims={"x": self.input_dim},
                expert_hidden=expert_hidden,
                activation=activation,
                routing=routing,
            )
        )
        self.add_towers(tower_hidden, activation, tower_dropout)
