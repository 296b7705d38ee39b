"""MTMT (Wei et al., Tencent, arXiv 2408.12803, "Multi-Treatment Multi-Task Uplift Modeling
for Enhancing User Growth"), and a multi-head baseline of the same encoder.

Uplift data names the arm ``m`` each row received (0 = control, 1..A-1 the treatments). Per
task ``k`` the model gives the response to every arm, as logits ``[B, A, T]``:

    h_k        = MMoE(x)_k                                   # the user, per task   [B, H]
    y_k(0)     = tower_k(h_k)                                # natural response (control)
    U_k        = h_k as n tokens of width H / n, each L2-normalised   # the user's [B, n, H/n]
    q^base     , q^m                                         # treatment queries    [q, d] each
    tau_k^b(x) = w_k^b . mean_q Enh_k^b(MHA_k^b(Q = q^base, K = V = U_k))
    tau_k^m(x) = w_k^m . mean_q Enh_k^m(MHA_k^m(Q = q^m,    K = V = U_k))
    y_k(m)     = sg(y_k(0)) + tau_k^b(x) + tau_k^m(x)        # m >= 1 (logits)

``Enh`` is the feature enhancer, an MLP ``d -> hidden -> d`` with GELU; ``MHA`` multi-head
cross-attention with the treatment as the query over the user's tokens. The loss is each
task's BCE on the arm each row received only (the module's, with its weighting options).

What is the paper's (as its text and public code, yuxiangwei0808/Tencent_uplift, describe it):
the MMoE user encoder with one representation per task and its natural-response head; a base
"any treatment" embedding and a per-arm one; cross-attention with the treatment as query and
the user as key and value, then the feature-enhancer MLP, then a head giving the effect; the
tiered sum ``y(0) + tau^base + tau^m``, with the natural response not trained through the
treated arms (``sg``, stop-gradient: ``detach_natural``); the loss on the observed arm.

What is our reading:
- each effect head starts at zero (the model starts from "no treatment changes anything");
- the user's tokens: the paper's experts are 1-D convolutional nets whose output positions are
  the tokens; ours are MLP experts, so a task's mixed representation is cut into ``n`` tokens;
- a treatment is ``q`` learned query tokens of width ``d`` (its code turns a 16-d embedding into
  16 one-wide tokens);
- BCE on logits (its code regresses with MSE; our tasks are binary), and no extra penalty on tau
  (its code's hinge on tau^2 targets its own data);
- tau per task for both tiers (the paper's; its code shares the treatment embeddings across
  tasks, as we do, and has per-task attention only in one branch).

Ablations are switches: ``interaction: mlp`` (no cross-attention: tau from an MLP of
``[h_k ; mean_q q]``), ``tiered: false`` (no base effect: ``y_k(m) = sg(y_k(0)) + tau_k^m``),
``shared_tau: true`` (one effect for every task, from the mean of the tasks' tokens),
``detach_natural: false`` (no ``sg``), ``normalize_tokens: false`` (the user's tokens as they
are).

``ArmHeads`` is the multi-head baseline (TARNet-like, one head per arm per task over the same
MMoE encoder): ``y_k(m) = tower_{m,k}(h_k)``.

Outputs: ``arm_logits [B, A, T]``, ``logits [B, T]`` (the observed arm's; control's when no
arm is given), and MTMT's effects on the logit scale, ``base_effect [B, T]`` and
``arm_effect [B, A-1, T]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import Internals
from ranker.layers import Tower, towers_together
from ranker.models.base import Outputs, arm_outputs
from ranker.models.mmoe import MMoE


def _check_arms(inputs: InputSpec, model: str) -> int:
    if len(inputs.arms) < 2:
        raise ValueError(
            f"{model} is an uplift model: the dataset config needs a treatment (column and "
            f"control value) with at least one arm besides control; arms: {list(inputs.arms)}"
        )
    return len(inputs.arms)


class TreatmentUserInteraction(nn.Module):
    """Per query set, an effect per row: ``w . mean_q Enh(MHA(Q = queries, K = V = tokens))``.

    ``queries [G, q, d]`` (G sets, e.g. one per arm), ``tokens [B, n, w]`` -> ``[B, G]``. Each
    query token attends on its own, so the G sets run as one attention of ``G q`` queries.
    ``mlp``: no attention, ``w . MLP([mean_n tokens ; mean_q queries])``.
    """

    def __init__(
        self,
        token_width: int,
        dim: int,
        heads: int,
        hidden: int,
        mode: Literal["attention", "mlp"],
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.mode, self.heads, self.normalize = mode, heads, normalize
        if mode == "attention":
            if dim % heads:
                raise ValueError(f"MTMT: attention_dim {dim} does not split into {heads} heads")
            self.query, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.key, self.value = nn.Linear(token_width, dim), nn.Linear(token_width, dim)
            for linear in (self.query, self.key, self.value):
                nn.init.xavier_uniform_(linear.weight)
            for linear in (self.query, self.key, self.value, self.out):
                nn.init.zeros_(linear.bias)
            self.enhancer = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        else:
            self.enhancer = nn.Sequential(
                nn.Linear(token_width + dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
            )
        self.effect = nn.Linear(dim, 1)
        nn.init.zeros_(self.effect.weight)  # every effect starts at 0: "the treatment does nothing"
        nn.init.zeros_(self.effect.bias)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        groups, q, d = queries.shape
        if self.mode == "mlp":
            user = tokens.mean(1).unsqueeze(1).expand(-1, groups, -1)
            treatment = queries.mean(1).unsqueeze(0).expand(len(tokens), -1, -1)
            return self.effect(self.enhancer(torch.cat([user, treatment], -1))).squeeze(-1)
        if self.normalize:
            tokens = nn.functional.normalize(tokens, dim=-1)  # each user token L2-normalised
        attended = self.attend(queries.reshape(groups * q, d), tokens)  # [B, G q, d]
        enhanced = self.enhancer(attended).unflatten(1, (groups, q)).mean(2)
        return self.effect(enhanced).squeeze(-1)

    def attend(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of ``queries [Q, d]`` (the same for every row: projected
        once) over ``tokens [B, n, w]`` -> ``[B, Q, d]``."""
        h = self.heads
        query = self.query(queries).unflatten(-1, (h, -1)).transpose(0, 1)  # [h, Q, d/h]
        key = self.key(tokens).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, h, n, d/h]
        value = self.value(tokens).unflatten(-1, (h, -1)).transpose(1, 2)
        scores = torch.einsum("hqe,bhne->bhqn", query, key) * query.shape[-1] ** -0.5
        mixed = torch.einsum("bhqn,bhne->bhqe", scores.softmax(-1), value)
        return self.out(mixed.transpose(1, 2).flatten(2))


class MTMT(MMoE):
    models_treatment = True
    compiled_parts = ("outputs",)

    def __init__(
        self,
        inputs: InputSpec,
        tasks: Sequence[TaskSpec],
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        tower_dropout: float = 0.0,
        activation: str = "relu",
        user_tokens: int = 8,
        treatment_tokens: int = 4,
        attention_dim: int = 64,
        heads: int = 4,
        enhancer_hidden: int = 128,
        interaction: Literal["attention", "mlp"] = "attention",
        tiered: bool = True,
        shared_tau: bool = False,
        detach_natural: bool = True,
        normalize_tokens: bool = True,
    ) -> None:
        arms = _check_arms(inputs, "MTMT")
        super().__init__(inputs, tasks, num_experts, expert_hidden, tower_hidden, tower_dropout,
                         activation)  # fmt: skip
        width = self.layers[-1].output_dim
        if width % user_tokens:
            raise ValueError(
                f"MTMT: the experts' output width {width} does not cut into user_tokens="
                f"{user_tokens} tokens"
            )
        self.user_tokens, self.shared_tau = user_tokens, shared_tau
        self.detach_natural = detach_natural
        d, q = attention_dim, treatment_tokens
        self.base_query = nn.Parameter(torch.randn(1, q, d) * 0.02)  # any treatment
        self.arm_query = nn.Parameter(torch.randn(arms - 1, q, d) * 0.02)  # each arm's own
        branches = 1 if shared_tau else len(self.tasks)

        def interactions() -> nn.ModuleList:
            return nn.ModuleList(
                TreatmentUserInteraction(
                    width // user_tokens, d, heads, enhancer_hidden, interaction, normalize_tokens
                )
                for _ in range(branches)
            )

        self.base_effects = interactions() if tiered else None  # None: not tiered
        self.arm_effects = interactions()

    def outputs(
        self, x: torch.Tensor, internals: Internals | None, treatment: torch.Tensor | None
    ) -> Outputs:
        users = self.task_representations({"x": x}, internals)
        natural = towers_together(self.towers, users)  # y_k(0) [B, T]
        if self.shared_tau:
            users = [torch.stack(users).mean(0)]
        tokens = [u.unflatten(1, (self.user_tokens, -1)) for u in users]
        arm = torch.stack(
            [f(self.arm_query, t) for f, t in zip(self.arm_effects, tokens, strict=True)], -1
        )  # [B, A-1, T or 1]
        base = torch.zeros_like(arm[:, :1])
        if self.base_effects is not None:
            base = torch.stack(
                [f(self.base_query, t) for f, t in zip(self.base_effects, tokens, strict=True)],
                -1,
            )  # [B, 1, T or 1]
        tasks = natural.shape[1]
        arm, base = arm.expand(-1, -1, tasks), base.expand(-1, -1, tasks)
        anchor = natural.detach() if self.detach_natural else natural
        treated = anchor.unsqueeze(1) + base + arm  # [B, A-1, T]
        outputs = arm_outputs(torch.cat([natural.unsqueeze(1), treated], 1), treatment)
        return {**outputs, "base_effect": base[:, 0], "arm_effect": arm}


class ArmHeads(MMoE):
    """The multi-head baseline: one tower per arm and task over MMoE's task representations,
    ``y_k(m) = tower_{m,k}(h_k)``; each head learns from its arm's rows only."""

    models_treatment = True
    compiled_parts = ("outputs",)

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
        arms = _check_arms(inputs, "ArmHeads")
        super().__init__(inputs, tasks, num_experts, expert_hidden, tower_hidden, tower_dropout,
                         activation)  # fmt: skip
        width = self.layers[-1].output_dim
        self.arm_towers = nn.ModuleList(
            nn.ModuleList(Tower(width, tower_hidden, activation, tower_dropout) for _ in tasks)
            for _ in range(arms - 1)
        )

    def outputs(
        self, x: torch.Tensor, internals: Internals | None, treatment: torch.Tensor | None
    ) -> Outputs:
        users = self.task_representations({"x": x}, internals)
        per_arm = [towers_together(self.towers, users)]  # control's heads
        per_arm += [towers_together(towers, users) for towers in self.arm_towers]
        return arm_outputs(torch.stack(per_arm, 1), treatment)
