"""HoME (Wang et al., "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", arXiv 2408.05430), each mechanism a switch so ablations are configs.

- Expert normalisation & Swish (``expert_norm``, ``activation: swish``): every expert layer is
  ``Swish(BatchNorm(W x))``, aligning expert output distributions so gates weigh them fairly
  instead of collapsing onto the expert with the largest scale (ReLU experts with >90% zeros).
- Hierarchy mask (``hierarchy``): a meta layer over the embedded input ``x`` with global shared
  experts E^s and one pool E^g per task group (the dataset's ``group``: e.g. watch /
  interaction). Group g's gate sees only E^s and E^g; the shared gate sees all:

      v^g = softmax(W^g x) . [E^s(x), E^g(x)]         v^s = softmax(W^s x) . [E^s, E^1 .. E^G]

  The task layer then reads ``u^g = [v^g ; v^s]`` for group g: its group experts and task
  experts take ``u^g``, its global shared experts take ``v^s``, and task t (in group g) mixes
  only its own experts, its group's and the global shared ones:

      h_t = softmax(W_t u^g) . [E_t(u^g), E^g(u^g), E^s(v^s)]

  With ``hierarchy: false`` there is one flat layer on ``x``: shared + task experts, each task
  gate over its own and the shared experts, i.e. CGC.
- Feature gate (``feature_gate_rank > 0``): each expert k gets its own view of its input,
  ``x_k = x * 2 * sigmoid(x B_k A_k)`` with rank-r ``B_k A_k``, ``A_k = 0`` at the start.
- Self gate (``self_gate``): task t's own experts are added back as a residual,
  ``h_t += sigmoid(w_t u) E_t(u)`` (one expert) or ``softmax(W_t u) . E_t(u)`` (several), so a
  sparse task's experts always receive gradient.

Towers read ``h_t``. All switches off gives exactly a one-level CGC of the same sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertLayer, GateSpec, PoolSpec, Routing
from ranker.models.base import ExpertModel


class HoME(ExpertModel):
    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        shared_experts: int = 2,
        group_experts: int = 2,
        task_experts: int = 1,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "swish",
        expert_norm: bool = True,
        hierarchy: bool = True,
        feature_gate_rank: int = 8,
        self_gate: bool = True,
        routing: Routing | None = None,
    ) -> None:
        super().__init__(inputs, tasks)
        self.groups = list(dict.fromkeys(t.group for t in self.tasks))
        expert = {
            "expert_hidden": expert_hidden,
            "activation": activation,
            "normalize": expert_norm,
            "feature_gate_rank": feature_gate_rank,
            "routing": routing,
        }
        residual = "self_gate" if self_gate else None
        if hierarchy:
            meta = ExpertLayer(
                "meta",
                pools=[
                    PoolSpec("shared", ("x",), shared_experts),
                    *(PoolSpec(f"group:{g}", ("x",), group_experts) for g in self.groups),
                ],
                gates=[
                    *(
                        GateSpec(f"group:{g}", ("x",), ("shared", f"group:{g}"))
                        for g in self.groups
                    ),
                    GateSpec("shared", ("x",), ("shared", *(f"group:{g}" for g in self.groups))),
                ],
                input_dims={"x": self.input_dim},
                **expert,
            )
            self.layers.append(meta)
            upper = {g: (f"group:{g}", "shared") for g in self.groups}  # u^g = [v^g ; v^s]
            pools = [PoolSpec("shared", ("shared",), shared_experts)]
            pools += [PoolSpec(f"group:{g}", upper[g], group_experts) for g in self.groups]
            pools += [
                PoolSpec(k, upper[t.group], task_experts)
                for k, t in zip(self.task_keys, self.tasks, strict=True)
            ]
            gates = [
                GateSpec(k, upper[t.group], (k, f"group:{t.group}", "shared"), residual, own=k)
                for k, t in zip(self.task_keys, self.tasks, strict=True)
            ]
            dims = dict.fromkeys(["shared", *(f"group:{g}" for g in self.groups)], meta.output_dim)
        else:
            pools = [PoolSpec(k, ("x",), task_experts) for k in self.task_keys]
            pools.append(PoolSpec("shared", ("x",), shared_experts))
            gates = [GateSpec(k, ("x",), (k, "shared"), residual, own=k) for k in self.task_keys]
            dims = {"x": self.input_dim}
        self.layers.append(ExpertLayer("task", pools, gates, dims, **expert))
        self.add_towers(tower_hidden, activation, tower_dropout)
