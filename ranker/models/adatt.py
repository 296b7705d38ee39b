"""AdaTT (Li et al., "AdaTT: Adaptive Task-to-Task Fusion Network for Multitask Learning in
Recommendations", KDD 2023).

Every task has its own experts (AdaTT-sp); at every fusion level, task t's gate reads task t's
stream and mixes the experts of *all* tasks, so each task learns how much to take from each
other task; a residual adds the task's native experts back (eq. 2-5 of the paper):

    E^l          = [E_1^l(h_1^(l-1)) .. E_T^l(h_T^(l-1))]        # every task's experts
    h_t^l        = softmax(W_t^l h_t^(l-1)) . E^l  +  NativeExperts_t^l
    NativeExperts_t^l = v_t^l . E_t^l    (a learned linear combination; E_t^l itself if m = 1)

With ``shared_experts > 0`` (the paper's variant with shared experts), a shared module reads
its own stream, every gate also mixes the shared experts, and on inner levels a shared gate
produces the next shared stream. ``h_t^0 = x``; the towers read the last level's ``h_t``.
"""

from __future__ import annotations

from collections.abc import Sequence

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertLayer, GateSpec, PoolSpec, Routing
from ranker.models.base import ExpertModel


class AdaTT(ExpertModel):
    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        levels: int = 2,
        task_experts: int = 2,
        shared_experts: int = 0,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "relu",
        native_residual: bool = True,
        routing: Routing | None = None,
    ) -> None:
        super().__init__(inputs, tasks)
        if levels < 1 or task_experts < 1:
            raise ValueError("AdaTT needs levels >= 1 and task_experts >= 1")
        residual = "native" if native_residual else None
        modules = [*self.task_keys, "shared"] if shared_experts else list(self.task_keys)
        dims = {"x": self.input_dim}
        for j in range(levels):
            source = {k: "x" if j == 0 else k for k in modules}
            pools = [PoolSpec(k, (source[k],), task_experts) for k in self.task_keys]
            if shared_experts:
                pools.append(PoolSpec("shared", ("x" if j == 0 else "shared",), shared_experts))
            every = tuple(p.name for p in pools)
            fused = list(self.task_keys) if j == levels - 1 else modules
            gates = [GateSpec(k, (source[k],), every, residual, own=k) for k in fused]
            layer = ExpertLayer(
                f"level{j}", pools, gates, dims, expert_hidden, activation, routing=routing
            )
            self.layers.append(layer)
            dims = dict.fromkeys(modules, layer.output_dim)
        self.add_towers(tower_hidden, activation, tower_dropout)
