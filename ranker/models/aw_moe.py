"""AW-MoE ("Attention Weighted Mixture of Experts with Contrastive Learning for Personalized
Ranking in E-commerce", ICDE 2023, arXiv 2306.05011), in multi-task form.

What the paper states (its abstract; the full text was not available to us): the user's
behaviour sequence is fed to the experts and to the gate network; the gate network has an
*activation unit* and a *gate unit* that learn, with attention, a personalised activation
vector over the experts; a random mask on the behaviour sequence simulates long-tail users,
and an auxiliary contrastive loss on the gate network's output improves generalisation for
them.

**Our reading** (these equations are ours). Experts ``f_1 .. f_E`` read the zoo's input ``x``
(the embedded features and the pooled sequences). Over the gating sequence's behaviour
embeddings ``e_1 .. e_L`` (mask ``m``) and the candidate's embedding ``q``, task t's gate is

    a^t_j = MLP_t([e_j, q, e_j - q, e_j * q])                  # activation unit (DIN's)
    v^t   = sum_j softmax_j(a^t over m_j = 1) e_j                # the attended behaviours
    g^t   = softmax(W_t [v^t ; q] + b_t)                         # gate unit, [E]
    h_t   = sum_e g^t_e f_e(x),      y_t = sigmoid(tower_t(h_t))

(``T = 1`` is the paper's single-task form; an empty history gives ``v^t = 0``: the gate falls
back on the candidate alone.) The contrastive term, in training only: every row again with
each behaviour dropped with probability ``mask_rate``; its gate output ``g'^t`` must be close
to the row's own ``g^t`` and far from the other rows' (InfoNCE over the batch on the
L2-normalised gate outputs, temperature ``tau``):

    L_cl = mean_t mean_b -log( exp(<z'_b, z_b> / tau) / sum_c exp(<z'_b, z_c> / tau) )

added to the loss as ``contrastive_weight * L_cl``. DeepSeekMoE's ``routing`` options apply to
the gates (top-k over the softmax; the contrast reads the softmax before top-k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertLayer, GateSpec, Internals, PoolSpec, Routing
from ranker.models.base import ExpertModel, Outputs, Sequences
from ranker.sequence import TargetAttention


class AWMoE(ExpertModel):
    splits_request = False  # its gates read the candidate's id beside the sequence

    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "relu",
        gate_sequence: str | None = None,
        attention_hidden: int = 32,
        mask_rate: float = 0.3,
        temperature: float = 0.1,
        contrastive_weight: float = 0.1,
        routing: Routing | None = None,
    ) -> None:
        if inputs.arms:
            raise ValueError(
                "AW-MoE does not take a treatment (uplift data): use MTMT, or another model of "
                "the zoo as an S-learner"
            )
        super().__init__(inputs, tasks)
        if not inputs.sequences:
            raise ValueError(
                "AW-MoE gates on a behaviour sequence: the dataset config has no feature of "
                "kind: sequence"
            )
        specs = {s.name: s for s in inputs.sequences}
        name = gate_sequence or inputs.sequences[0].name
        if name not in specs:
            raise ValueError(f"gate_sequence '{name}' is not a sequence feature: {list(specs)}")
        if not 0.0 <= mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in [0, 1), got {mask_rate}")
        if temperature <= 0 or contrastive_weight < 0:
            raise ValueError("AW-MoE needs temperature > 0 and contrastive_weight >= 0")
        spec, names = specs[name], list(inputs.cat_names)
        self.gate_sequence = name
        self.vocabulary = names.index(spec.vocabulary)
        self.target = names.index(spec.target or spec.vocabulary)  # the candidate's id
        dim = inputs.embedding_dims[self.vocabulary]
        self.attention = nn.ModuleDict(
            {k: TargetAttention(dim, attention_hidden) for k in self.task_keys}
        )
        self.mask_rate, self.temperature = mask_rate, temperature
        self.contrastive_weight = contrastive_weight
        gate_inputs = {f"gate:{k}": 2 * dim for k in self.task_keys}
        self.layers.append(
            ExpertLayer(
                "aw_moe",
                pools=[PoolSpec("shared", ("x",), num_experts)],
                gates=[GateSpec(k, (f"gate:{k}",), ("shared",)) for k in self.task_keys],
                input_dims={"x": self.input_dim, **gate_inputs},
                expert_hidden=expert_hidden,
                activation=activation,
                routing=routing,
            )
        )
        self.add_towers(tower_hidden, activation, tower_dropout)

    def gate_ids(self, cat: torch.Tensor, sequences: Sequences) -> torch.Tensor:
        """The gating sequence's behaviours the gates attend to: ``[B, L]``, or with
        ``pooling: search`` the ``[B, K]`` most relevant to the candidate."""
        i = self.pooling.index(self.gate_sequence)
        return self.pooling.relevant(
            i, self.embedding, self.pooling.inputs_of(i, cat, sequences or {})
        )

    def gate_inputs(
        self,
        cat: torch.Tensor,
        sequences: Sequences,
        keep: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``[v^t ; q]`` ``[B, 2D]`` per task gate; ``keep`` (shaped as ``gate_ids``) masks
        behaviours out; ``ids``: ``gate_ids`` when already searched."""
        ids = self.gate_ids(cat, sequences) if ids is None else ids
        e = self.pooling.embed(self.pooling.index(self.gate_sequence), self.embedding, ids)
        q = self.embedding.lookup(self.target, cat[:, self.target])  # [B, D]
        mask = ids > 0 if keep is None else (ids > 0) & keep
        return {
            f"gate:{k}": torch.cat([unit(e, q, mask), q], dim=1)
            for k, unit in self.attention.items()
        }

    def _outputs(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences,
        internals: Internals | None,
        gates: dict[str, torch.Tensor] | None = None,
    ) -> Outputs:
        self.embedding.fetch(cat, sequences)  # the gates read the embeddings before ``embed``
        gates = self.gate_inputs(cat, sequences) if gates is None else gates
        return self.towers_on({"x": self.embed(cat, num, sequences), **gates}, internals)

    # ``treatment``: the signature's; always None (AW-MoE refuses uplift data).
    def forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> Outputs:
        return self._outputs(cat, num, sequences, None)

    def forward_with_internals(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> tuple[Outputs, Internals]:
        internals = Internals()
        return self._outputs(cat, num, sequences, internals), internals

    def gate_probabilities(self, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task gate's softmax (before any top-k) on gate inputs ``gates``: ``[B, E]``."""
        layer = self.layers[0].gates
        return {k: torch.softmax(layer[k](gates[f"gate:{k}"]), dim=-1) for k in self.task_keys}

    def contrastive_loss(
        self,
        cat: torch.Tensor,
        sequences: Sequences,
        gates: dict[str, torch.Tensor] | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``L_cl``, averaged over tasks, between every row (gate inputs ``gates`` of the
        gate ids ``ids``, computed if not given) and its masked copy."""
        ids = self.gate_ids(cat, sequences) if ids is None else ids
        keep = torch.rand(ids.shape, device=ids.device) >= self.mask_rate
        gates = self.gate_inputs(cat, sequences, ids=ids) if gates is None else gates
        original = self.gate_probabilities(gates)
        masked = self.gate_probabilities(self.gate_inputs(cat, sequences, keep, ids))
        rows = torch.arange(len(ids), device=ids.device)
        losses = []
        for k in self.task_keys:
            z, z_masked = F.normalize(original[k], dim=1), F.normalize(masked[k], dim=1)
            losses.append(F.cross_entropy(z_masked @ z.T / self.temperature, rows))
        return torch.stack(losses).mean()

    def training_forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> tuple[Outputs, dict[str, torch.Tensor]]:
        self.embedding.fetch(cat, sequences)
        ids = self.gate_ids(cat, sequences)  # searched once, for the logits and the contrast
        gates = self.gate_inputs(cat, sequences, ids=ids)
        internals = Internals() if self.routed else None
        outputs = self._outputs(cat, num, sequences, internals, gates)
        auxiliary = self.auxiliary_losses(internals) if internals is not None else {}
        if self.contrastive_weight:
            loss = self.contrastive_loss(cat, sequences, gates, ids)
            auxiliary["contrastive"] = self.contrastive_weight * loss
        return outputs, auxiliary
