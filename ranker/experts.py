"""Experts and gates: the one mechanism MMoE, CGC / PLE, AdaTT and HoME are built from.

A model is a stack of ``ExpertLayer``s. A layer holds named **expert pools** and named
**gates**:

- a pool is ``n`` experts reading one *representation* (a named tensor: the embedded input
  ``x``, a task's or a group's output of the layer below, or the concatenation of several);
- a gate reads a representation and mixes the experts of the pools it lists, producing a new
  representation under its own name. A gate never sees a pool it does not list, so structural
  masks (PLE's task-specific experts, HoME's hierarchy) hold by construction.

Options serve the papers' mechanisms: ``normalize`` (HoME's expert normalisation: BatchNorm
on every expert's output), ``activation`` (Swish), ``feature_gate_rank`` (HoME's LoRA-style
per-expert feature gate), a gate's ``residual`` over its own pool (HoME's self gate, AdaTT's
native-expert residual), a gate's ``always`` pools (DeepSeekMoE's always-on shared experts),
and ``Routing`` (DeepSeekMoE's fine-grained experts, top-k routing and balance loss). Every
expert output and gate weight can be recorded in an ``Internals`` for diagnostics and the
balance loss, outside the ONNX path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ranker.layers import ACTIVATIONS, RequestSplit, as_dense, linear

Residual = Literal["self_gate", "native"]


@dataclass
class Internals:
    """What diagnostics read: every expert's output and every gate's weights, for one batch.

    ``experts["<layer>/<pool>"]`` is ``[B, n, D]``; ``gates["<layer>/<gate>"]`` is
    ``(expert names, weights [B, E])`` with expert names ``"<layer>/<pool>/<i>"``.
    """

    experts: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: dict[str, tuple[list[str], torch.Tensor]] = field(default_factory=dict)
    # Top-k gates only: sum_i f_i P_i of the batch (``Routing``), a scalar per gate.
    balance: dict[str, torch.Tensor] = field(default_factory=dict)
    # Top-k gates only: each row's gap between its k-th and (k+1)-th logit, ``[B]``; where it
    # is within rounding, another runtime may route the row to other experts.
    margins: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Routing:
    """DeepSeekMoE-style routing (Dai et al., arXiv 2401.06066) for every gate of a layer.

    - ``granularity`` m: fine-grained experts, each routed pool has m times as many experts,
      each inner layer 1/m as wide (the output width stays; for two-layer experts the weight
      count is unchanged). Always-on pools (``GateSpec.always``) are not split.
    - ``top_k`` k: a row keeps its k largest gate weights, renormalised to sum to 1 (computed
      densely, then masked: the ONNX graph holds a TopK); 0 = every expert (plain softmax).
    - ``balance`` alpha: the expert-balance loss of each top-k gate over a batch of T rows,
      N routed experts,

          L_bal = alpha * sum_i f_i P_i,   f_i = N / (k T) * sum_t 1[i in top-k(t)],
                                           P_i = 1 / T * sum_t s_{i,t}

      (``s`` the softmax before top-k); ``L_bal = alpha`` when the load is even. A model's
      auxiliary loss averages it over its top-k gates.
    """

    top_k: int = 0
    granularity: int = 1
    balance: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.granularity < 1 or self.balance < 0:
            raise ValueError(f"routing needs top_k >= 0, granularity >= 1, balance >= 0: {self}")
        if self.balance and not self.top_k:
            raise ValueError("routing.balance weighs the load of top-k routing: set top_k")

    def widths(self, hidden: Sequence[int]) -> tuple[int, ...]:
        """An expert's layer widths once fine-grained: the inner ones divided by m."""
        m = self.granularity
        if m == 1:
            return tuple(hidden)
        if len(hidden) < 2 or any(w % m for w in hidden[:-1]):
            raise ValueError(
                f"granularity {m} splits an expert's inner layers: expert_hidden needs two or "
                f"more layers, the inner ones divisible by {m} (got {list(hidden)})"
            )
        return (*(w // m for w in hidden[:-1]), hidden[-1])

    def margin(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The gap between each row's k-th and (k+1)-th largest logit ``[B]`` (None without
        top-k)."""
        k = self.top_k
        if not k or k >= logits.shape[-1]:
            return None
        top = logits.topk(k + 1, dim=-1).values
        return top[:, k - 1] - top[:, k]

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gate logits ``[B, E]`` -> (weights ``[B, E]``, ``sum_i f_i P_i`` or None). The
        experts a row is routed to are those with a weight above 0."""
        probs = torch.softmax(logits, dim=-1)
        k = self.top_k
        if not k or k >= probs.shape[-1]:
            return probs, None
        # On the logits: the same choice as on the softmax, with fewer ties to break.
        chosen = torch.zeros_like(probs).scatter(-1, logits.topk(k, dim=-1).indices, 1.0)
        kept = probs * chosen
        weights = kept / kept.sum(-1, keepdim=True)
        load = chosen.mean(0) * (probs.shape[-1] / k)  # f_i
        return weights, (load * probs.mean(0)).sum()


def pooled_matmul(
    x: torch.Tensor | RequestSplit, weights: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [B, D] @ weights [n, D, H] (+ bias [n, H]) -> [B, n, H]``, every expert reading the
    same ``x``: one matmul against the ``[D, n * H]`` stack (a single GEMM in torch and in the
    exported graph, where ``einsum`` ran as a slow generic kernel; split per part for a
    ``RequestSplit``), the bias added by the GEMM itself."""
    n, d, h = weights.shape
    stacked = weights.permute(1, 0, 2).reshape(d, n * h)
    flat = None if bias is None else bias.reshape(n * h)
    if isinstance(x, RequestSplit):
        out = x.matmul(stacked, flat)
    else:
        out = x @ stacked if flat is None else torch.addmm(flat, x, stacked)
    return out.view(-1, n, h)


def batched_matmul(
    x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [B, n, D] @ weights [n, D, H] (+ bias [n, H]) -> [B, n, H]``: expert ``k``'s rows
    times its own weights (one batched matmul over the experts, adding the bias)."""
    rows = x.transpose(0, 1)
    out = (
        torch.matmul(rows, weights) if bias is None else torch.baddbmm(bias[:, None], rows, weights)
    )
    return out.transpose(0, 1)


class FeatureGate(nn.Module):
    """HoME's feature gate for ``n`` experts: ``x_k = x * 2 * sigmoid(x B_k A_k)``, rank ``r``.

    ``A_k`` starts at zero, so every gate starts as the identity (``2 * sigmoid(0) = 1``) and
    each expert learns its own view of the input from there. ``[B, D] -> [B, n, D]``.
    """

    def __init__(self, dim: int, rank: int, num_experts: int = 1) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(num_experts, dim, rank))  # B_k
        self.up = nn.Parameter(torch.zeros(num_experts, rank, dim))  # A_k
        nn.init.uniform_(self.down, -(dim**-0.5), dim**-0.5)

    def forward(self, x: torch.Tensor | RequestSplit) -> torch.Tensor:
        low = pooled_matmul(x, self.down)  # [B, n, r]
        return as_dense(x).unsqueeze(1) * 2 * torch.sigmoid(batched_matmul(low, self.up))


class ExpertPool(nn.Module):
    """``n`` experts on the same input, computed together: ``[B, D_in] -> [B, n, D]``.

    Each expert is a stack of ``Linear -> (BatchNorm) -> activation`` layers; ``normalize`` is
    HoME's expert normalisation. The ``n`` experts' weights are stacked so a layer is one
    batched matmul for the whole pool, not ``n`` small ones.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        normalize: bool = False,
        feature_gate_rank: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.feature_gate = (
            FeatureGate(input_dim, feature_gate_rank, num_experts) if feature_gate_rank else None
        )
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.norms = nn.ModuleList()
        for width in hidden:
            bound = input_dim**-0.5  # nn.Linear's default initialisation, per expert
            self.weights.append(nn.Parameter(torch.empty(num_experts, input_dim, width)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, width)))
            nn.init.uniform_(self.weights[-1], -bound, bound)
            nn.init.uniform_(self.biases[-1], -bound, bound)
            # One BatchNorm over all n * width features = a BatchNorm per expert.
            self.norms.append(nn.BatchNorm1d(num_experts * width) if normalize else nn.Identity())
            input_dim = width
        self.activation = ACTIVATIONS[activation]()
        self.output_dim = input_dim

    def __len__(self) -> int:
        return self.num_experts

    @torch.no_grad()
    def fold_norms(self) -> None:
        """For inference: each eval-mode BatchNorm folded into the weights and bias before it,
        ``W' = W * s``, ``b' = (b - mu) * s + beta`` with ``s = gamma / sqrt(var + eps)``, so
        a layer is one matmul and an add (the outputs are unchanged up to rounding)."""
        for layer, norm in enumerate(self.norms):
            if not isinstance(norm, nn.BatchNorm1d):
                continue
            shape = self.biases[layer].shape  # [n, width]
            scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).view(shape)
            self.weights[layer].mul_(scale.unsqueeze(1))
            shifted = (self.biases[layer] - norm.running_mean.view(shape)) * scale
            self.biases[layer].copy_(shifted + norm.bias.view(shape))
            self.norms[layer] = nn.Identity()

    def forward(self, x: torch.Tensor | RequestSplit) -> torch.Tensor:
        if self.feature_gate is not None:
            h = batched_matmul(self.feature_gate(x), self.weights[0], self.biases[0])
        else:
            h = pooled_matmul(x, self.weights[0], self.biases[0])
        for layer, norm in enumerate(self.norms):
            if layer:
                h = batched_matmul(h, self.weights[layer], self.biases[layer])
            if not isinstance(norm, nn.Identity):  # per expert: over the n * H features
                h = norm(h.flatten(1)).view(h.shape)
            h = self.activation(h)
        return h


def pools_together(
    pools: Sequence[ExpertPool], x: torch.Tensor | RequestSplit
) -> list[torch.Tensor]:
    """Several pools of one shape (``same_shape``) reading the same ``x``, computed as one pool:
    the first layer one matmul over all their experts' weights, each later layer one batched
    matmul, then each pool's own normalisation; the same outputs as ``[pool(x) for pool in
    pools]`` (PLE's, CGC's and AdaTT's task and shared pools: a few large kernels instead of
    many small ones)."""
    sizes = [pool.num_experts for pool in pools]

    def joined(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(
            torch.cat([getattr(p, kind)[layer] for p in pools]) for kind in ("weights", "biases")
        )

    h = pooled_matmul(x, *joined(0))
    for layer in range(len(pools[0].biases)):
        if layer:
            h = batched_matmul(h, *joined(layer))
        if not isinstance(pools[0].norms[layer], nn.Identity):
            parts = h.split(sizes, dim=1)
            normed = [
                p.norms[layer](part.flatten(1)).view_as(part)
                for p, part in zip(pools, parts, strict=True)
            ]
            h = torch.cat(normed, dim=1)
        h = pools[0].activation(h)
    return list(h.split(sizes, dim=1))


def same_shape(a: ExpertPool, b: ExpertPool) -> bool:
    """Whether two pools are computed as one (``pools_together``): of one shape, and without
    feature gates. With them (HoME) every expert reads its own gated input, the pools' first
    layers are batched matmuls anyway, and joining them cost more in copies than it saved in
    kernels (measured by ``benchmarks/train_step.py``; figures in ``benchmarks/RESULTS.md``)."""
    if a.feature_gate is not None or b.feature_gate is not None:
        return False
    widths = [tuple(w.shape[1:]) for w in a.weights], [tuple(w.shape[1:]) for w in b.weights]
    kinds = [type(n) for n in a.norms], [type(n) for n in b.norms]
    return (
        widths[0] == widths[1] and kinds[0] == kinds[1] and type(a.activation) is type(b.activation)
    )


class SelfGate(nn.Module):
    """HoME's self gate: a residual from a task's own experts, so they always get gradient.

    One expert: ``sigmoid(w x) * E(x)``; several: ``softmax(W x) . [E_1(x) .. E_n(x)]``.
    """

    def __init__(self, input_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_experts)

    def coefficients(self, x: torch.Tensor | RequestSplit, routed: torch.Tensor) -> torch.Tensor:
        """The weights of the own experts ``[B, n]`` (``routed``: the gate's own weights)."""
        logits = linear(x, self.linear)
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, -1)


class NativeResidual(nn.Module):
    """AdaTT's residual: a learned linear combination of a task's native experts (the expert
    itself when there is one), input-independent."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.weights = None
        if num_experts > 1:  # initialised as the reference implementation does
            bound = (1 / num_experts) ** 0.5
            self.weights = nn.Parameter(torch.empty(num_experts).uniform_(-bound, bound))

    def coefficients(self, x: torch.Tensor | RequestSplit, routed: torch.Tensor) -> torch.Tensor:
        """The weights of the native experts, the same for every row of ``routed [B, E]``
        (the gate's own weights): ``[B, n]``."""
        if self.weights is None:
            return routed.new_ones(routed.shape[0], 1)
        return self.weights.expand(routed.shape[0], -1)


@dataclass(frozen=True)
class PoolSpec:
    name: str
    inputs: tuple[str, ...]  # representations concatenated into the experts' input
    num_experts: int


@dataclass(frozen=True)
class GateSpec:
    name: str  # the representation this gate produces
    inputs: tuple[str, ...]  # representations concatenated into the gate's input
    pools: tuple[str, ...]  # the pools whose experts it mixes, in this order
    residual: Residual | None = None  # added: self gate / native residual over `own`
    own: str | None = None  # the pool the residual reads
    always: tuple[str, ...] = ()  # pools added with weight 1 each, beside the routed ones


class ExpertLayer(nn.Module):
    """One level of experts and gates; see the module docstring."""

    def __init__(
        self,
        name: str,
        pools: Sequence[PoolSpec],
        gates: Sequence[GateSpec],
        input_dims: dict[str, int],
        expert_hidden: Sequence[int],
        activation: str = "relu",
        normalize: bool = False,
        feature_gate_rank: int = 0,
        routing: Routing | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name  # prefixes what it records: "<layer>/<pool>", "<layer>/<gate>"
        # A config's mapping (``ranker.models.build``) or the dataclass (LightningCLI's).
        routing = Routing(**routing) if isinstance(routing, Mapping) else routing or Routing()
        self.gate_specs = tuple(gates)
        always = {pool for g in self.gate_specs for pool in g.always}
        m = {p.name: 1 if p.name in always else routing.granularity for p in pools}
        self.pool_specs = tuple(
            PoolSpec(p.name, p.inputs, p.num_experts * m[p.name]) for p in pools
        )
        self.routing = routing
        expert = {
            "activation": activation,
            "normalize": normalize,
            "feature_gate_rank": feature_gate_rank,
        }
        self.pools = nn.ModuleDict(
            {
                p.name: ExpertPool(
                    p.num_experts,
                    sum(input_dims[i] for i in p.inputs),
                    routing.widths(expert_hidden) if m[p.name] > 1 else tuple(expert_hidden),
                    **expert,
                )
                for p in self.pool_specs
            }
        )
        size = {p.name: p.num_experts for p in self.pool_specs}
        width = {g.name: sum(input_dims[i] for i in g.inputs) for g in self.gate_specs}
        self.gates = nn.ModuleDict(
            {
                g.name: nn.Linear(width[g.name], sum(size[p] for p in g.pools))
                for g in self.gate_specs
            }
        )
        self.residuals = nn.ModuleDict(
            {
                g.name: SelfGate(width[g.name], size[g.own])
                if g.residual == "self_gate"
                else NativeResidual(size[g.own])
                for g in self.gate_specs
                if g.residual
            }
        )
        self.output_dim = expert_hidden[-1]
        # Pools of one shape on the same input run as one pool; gates on the same input as
        # one matmul.
        self.pool_groups: list[tuple[tuple[str, ...], list[str]]] = []  # (input, pools)
        for p in self.pool_specs:
            group = next(
                (
                    names
                    for inputs, names in self.pool_groups
                    if inputs == p.inputs and same_shape(self.pools[names[0]], self.pools[p.name])
                ),
                None,
            )
            if group is None:
                self.pool_groups.append((p.inputs, [p.name]))
            else:
                group.append(p.name)
        self.gate_groups: dict[tuple[str, ...], list[str]] = {}
        for g in self.gate_specs:
            self.gate_groups.setdefault(g.inputs, []).append(g.name)
        self._mixing_matrix(size)

    def _mixing_matrix(self, size: dict[str, int]) -> None:
        """Every gate of the layer mixes the layer's experts (all pools, ``[B, E, D]``) with one
        batched matmul, ``[B, G, E] @ [B, E, D]``. Gate ``g``'s row of the ``[B, G, E]`` weights
        is its routed weights, plus its residual's weights on its own pool, plus 1 on each
        always-on pool, zero elsewhere: the coefficients of every gate, concatenated ``[B, J]``,
        times a fixed 0/1 matrix ``spread [J, G * E]``, plus the constant ``always [G * E]``."""
        start, experts = {}, 0
        for p in self.pool_specs:
            start[p.name], experts = experts, experts + size[p.name]

        def columns(pools: Sequence[str]) -> list[int]:
            return [start[p] + i for p in pools for i in range(size[p])]

        spread, always = [], torch.zeros(len(self.gate_specs), experts)
        for row, g in enumerate(self.gate_specs):
            for column in columns(g.pools) + (columns([g.own]) if g.residual else []):
                spread.append(row * experts + column)
            always[row, columns(g.always)] = 1.0
        matrix = torch.zeros(len(spread), len(self.gate_specs) * experts)
        matrix[torch.arange(len(spread)), torch.tensor(spread)] = 1.0
        identity = matrix.shape[0] == matrix.shape[1] and bool(
            (matrix == torch.eye(len(spread))).all()
        )
        self.register_buffer("spread", None if identity else matrix, persistent=False)
        self.register_buffer("always", always.flatten() if always.any() else None, persistent=False)
        self.total_experts = experts

    def _pool_outputs(self, read: Any) -> dict[str, torch.Tensor]:
        outputs = {}
        for inputs, group in self.pool_groups:
            x = read(inputs)
            if len(group) == 1:
                outputs[group[0]] = self.pools[group[0]](x)
            else:
                pools = [self.pools[name] for name in group]
                outputs.update(zip(group, pools_together(pools, x), strict=True))
        return outputs

    def _gate_logits(self, read: Any) -> dict[str, torch.Tensor]:
        logits = {}
        for keys, names in self.gate_groups.items():
            x = read(keys)
            if len(names) == 1:
                logits[names[0]] = linear(x, self.gates[names[0]])
                continue
            weight = torch.cat([self.gates[n].weight for n in names])
            bias = torch.cat([self.gates[n].bias for n in names])
            both = x.matmul(weight.T, bias) if isinstance(x, RequestSplit) else x @ weight.T + bias
            sizes = [self.gates[n].out_features for n in names]
            logits.update(zip(names, both.split(sizes, dim=-1), strict=True))
        return logits

    def forward(
        self, reps: dict[str, torch.Tensor], internals: Internals | None = None
    ) -> dict[str, torch.Tensor]:
        joined: dict[tuple[str, ...], torch.Tensor] = {}  # each concatenation built once

        def read(keys: tuple[str, ...]) -> torch.Tensor:
            if keys not in joined:
                parts = [reps[k] for k in keys]
                joined[keys] = (
                    parts[0] if len(parts) == 1 else torch.cat([as_dense(p) for p in parts], -1)
                )
            return joined[keys]

        outputs = self._pool_outputs(read)
        new = self._mix(outputs, self._gate_logits(read), read, internals)
        if internals is not None:
            internals.experts.update({f"{self.name}/{p}": o for p, o in outputs.items()})
        return new

    def _mix(
        self,
        outputs: dict[str, torch.Tensor],
        logits: dict[str, torch.Tensor],
        read: Any,
        internals: Internals | None,
    ) -> dict[str, torch.Tensor]:
        """Each gate's representation ``[B, D]``: its experts weighed by the routed weights,
        plus the always-on pools and the residual, all gates in one batched matmul
        (``_mixing_matrix``)."""
        coefficients = []
        for g in self.gate_specs:
            weights, balance = self.routing.route(logits[g.name])
            coefficients.append(weights)
            if g.residual:
                coefficients.append(self.residuals[g.name].coefficients(read(g.inputs), weights))
            if internals is not None:
                names = [f"{self.name}/{p}/{i}" for p in g.pools for i in range(len(self.pools[p]))]
                internals.gates[f"{self.name}/{g.name}"] = (names, weights)
                if balance is not None:
                    internals.balance[f"{self.name}/{g.name}"] = balance
                margin = self.routing.margin(logits[g.name])
                if margin is not None:
                    internals.margins[f"{self.name}/{g.name}"] = margin
        joined = torch.cat(coefficients, dim=1) if len(coefficients) > 1 else coefficients[0]
        mixing = joined if self.spread is None else joined @ self.spread
        if self.always is not None:
            mixing = mixing + self.always
        parts = [outputs[p.name] for p in self.pool_specs]
        experts = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [B, E, D]
        mixed = torch.matmul(mixing.view(-1, len(self.gate_specs), self.total_experts), experts)
        # unbind, not mixed[:, i]: its gradient is one stack, not a zero-filled [B, G, D] per gate
        return dict(zip((g.name for g in self.gate_specs), mixed.unbind(1), strict=True))
