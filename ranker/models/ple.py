"""CGC and PLE (Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task
Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

CGC (Customized Gate Control, eq. 1-3): shared experts E_s and task-specific experts E_t; task
t's gate mixes only its own experts and the shared ones:

    g_t(x) = softmax(W_t x) . [E_t,1(x) .. E_t,m_t(x), E_s,1(x) .. E_s,m_s(x)]

PLE (eq. 4-5) stacks J extraction levels. Level j's task experts read task t's output of
level j-1 and the shared experts read the shared output; on every level but the last a shared
gate mixes all experts (every task's and the shared ones) into the next shared input:

    g_t^j  = softmax(W_t^j g_t^(j-1)) . [E_t^j(g_t^(j-1)), E_s^j(g_s^(j-1))]
    g_s^j  = softmax(W_s^j g_s^(j-1)) . [E_1^j .. E_T^j, E_s^j]          (j < J)

CGC is PLE with one level (``levels: 1``).
"""

from __future__ import annotations

from collections.abc import Sequence

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertLayer, GateSpec, PoolSpec, Routing
from ranker.models.base import ExpertModel


class PLE(ExpertModel):
    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        levels: int = 2,
        shared_experts: int = 2,
        task_experts: int = 2,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "relu",
        routing: Routing | None = None,
    ) -> None:
        super().__init__(inputs, tasks)
        if levels < 1:
            raise ValueError(f"PLE needs at least one level, got {levels}")
        dims = {"x": self.input_dim}
        for j in range(levels):
            # Level 0 reads the embedded input; level j > 0 the same-named output of level j-1.
            source = {k: "x" if j == 0 else k for k in [*self.task_keys, "shared"]}
            pools = [PoolSpec(k, (source[k],), task_experts) for k in self.task_keys]
            pools.append(PoolSpec("shared", (source["shared"],), shared_experts))
            gates = [GateSpec(k, (source[k],), (k, "shared")) for k in self.task_keys]
            if j < levels - 1:
                gates.append(GateSpec("shared", (source["shared"],), (*self.task_keys, "shared")))
            layer = ExpertLayer(
                f"level{j}", pools, gates, dims, expert_hidden, activation, routing=routing
            )
            self.layers.append(layer)
            dims = dict.fromkeys([*self.task_keys, "shared"], layer.output_dim)
        self.add_towers(tower_hidden, activation, tower_dropout)
