"""The one signature every model of the zoo has:
``forward(cat [B, F_cat], num [B, F_num], sequences {name: [B, L]}) -> {name: tensor}``.

A model returns **named outputs** (``Outputs``): ``logits [B, T]`` (``features.contract.LOGITS``)
for every ranker, the output the loss, the metrics and calibration read; a model of another kind
adds its own names (an uplift model's ``arm_logits [B, A, T]``, a second head per task), and
scoring (``ranker.scoring``), export (one graph output per name) and ``ranker predict`` carry
them through without code of their own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from features.config import TaskSpec
from features.contract import ARM_LOGITS, LOGITS, RequestLayout
from features.history import ranker_cache
from features.state import InputSpec
from ranker.experts import Internals
from ranker.layers import FusedEmbedding, RequestSplit, Tower, towers_together
from ranker.sequence import Behaviours, SequencePooling

Sequences = dict[str, torch.Tensor] | None
Outputs = dict[str, torch.Tensor]  # name -> tensor; always ``logits [B, T]``


class MultiTaskModel(nn.Module):
    """Embeds the inputs once; subclasses map the embedded ``x`` to named outputs (``head``),
    ``logits [B, T]`` among them.

    ``x`` is every categorical feature's embedding, the numeric inputs, then each sequence
    pooled (``ranker.sequence``): so every model reads sequences without code of its own.

    ``forward`` is the exported path. ``forward_with_internals`` also returns every expert's
    output and every gate's weights (see ``ranker.experts.Internals``) for diagnostics.
    """

    splits_request = False  # whether ``head`` takes a ``RequestSplit`` (see ``embed_split``)
    # On uplift data (``inputs.arms``) a model of the zoo is an S-learner: the arm received
    # joins ``x`` as a one-hot, and scoring runs the head once per arm. An uplift model
    # (MTMT) takes the treatment its own way.
    models_treatment = False
    compiled_parts: tuple[str, ...] = ("head",)  # what ``compile_dense`` compiles

    def __init__(self, inputs: InputSpec, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.inputs = inputs
        self.tasks = tuple(tasks)
        self.embedding = FusedEmbedding(inputs)
        self.pooling = SequencePooling(inputs)

    @property
    def input_dim(self) -> int:
        return self.embedding.output_dim + self.pooling.output_dim + len(self.s_learner_arms)

    @property
    def s_learner_arms(self) -> tuple[str, ...]:
        """The arms the S-learner sees as a one-hot input (none for other data and models)."""
        return () if self.models_treatment else self.inputs.arms

    def embed(self, cat: torch.Tensor, num: torch.Tensor, sequences: Sequences) -> torch.Tensor:
        """The input ``x`` ``[B, input_dim]``."""
        self.embedding.fetch(cat, sequences)
        x = self.embedding(cat, num)
        if not self.inputs.sequences:
            return x
        return torch.cat([x, *self.pooling(self.embedding, cat, sequences or {})], dim=1)

    def compile_dense(self) -> None:
        """``torch.compile`` what follows the embedding lookup (``compiled_parts``; the
        lookup's sparse gradients do not compile), until ``eager()``. The compiled code is
        cached on disk across runs (``TORCHINDUCTOR_CACHE_DIR``, default
        ``$RANKER_CACHE/inductor``): a second run of the same shapes does not compile again."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ranker_cache() / "inductor"))
        # Static shapes: an epoch's batch sizes differ by one row at most, two graphs at most.
        self._compiled = {
            name: torch.compile(getattr(type(self), name).__get__(self), dynamic=False)
            for name in self.compiled_parts
        }
        self.use_compiled(True)

    def use_compiled(self, on: bool) -> None:
        """Run the compiled methods (``on``) or the eager ones, keeping what was compiled
        (training switches to eager for its validation passes: no graph to compile for them)."""
        for name, compiled in getattr(self, "_compiled", {}).items():
            if on:
                self.__dict__[name] = compiled
            else:
                self.__dict__.pop(name, None)

    def eager(self) -> None:
        """Back to the eager methods for good (a compiled function does not copy or pickle)."""
        self.use_compiled(False)
        self._compiled = {}

    def embed_split(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        request_cat: torch.Tensor,
        request_num: torch.Tensor,
        index: torch.Tensor,
        sequences: dict[str, torch.Tensor],
        layout: RequestLayout,
    ) -> RequestSplit:
        """``embed`` of inputs split as the exported scorer holds them (``layout``): the
        candidates' columns ``cat [N, F_c]``, ``num [N, F_nc]``, the request's ``request_cat
        [R, F_r]``, ``request_num [R, F_nr]`` and sequences ``[R, L]``, ``index [N]`` the
        request row of each candidate. A mean-pooled sequence stays a request column;
        attention whose query is a candidate feature makes a candidate column."""
        e, pooling = self.embedding, self.pooling
        on_candidate, on_request = layout.cat_candidate_columns, layout.cat_request_columns
        candidate, candidate_columns = e.embed_columns(cat, on_candidate)
        request, request_columns = e.embed_columns(request_cat, on_request)
        width = sum(e.dims)
        candidate_parts, request_parts = [candidate, num], [request, request_num]
        candidate_columns += [width + j for j in layout.num_candidate_columns]
        request_columns += [width + j for j in layout.num_request_columns]

        def per_candidate(j: int) -> torch.Tensor | None:  # categorical column j, [N]
            if j < 0:
                return None
            if layout.cat_request[j]:
                return request_cat[:, on_request.index(j)].index_select(0, index)
            return cat[:, on_candidate.index(j)]

        start = e.output_dim
        for i in pooling.pooled:
            spec = pooling.specs[i]
            columns = list(range(start, start + pooling.dims[i]))
            start += pooling.dims[i]
            ids = sequences[spec.name]
            by = sequences[spec.search_by] if spec.search_by else None
            target, key = pooling.target[i], pooling.key[i]
            if any(j >= 0 and not layout.cat_request[j] for j in (target, key)):
                rows = Behaviours(ids, per_candidate(target), by, per_candidate(key), index)
                candidate_parts.append(pooling.pool(i, e, rows))
                candidate_columns += columns
            else:
                query, attribute = (
                    request_cat[:, on_request.index(j)] if j >= 0 else None for j in (target, key)
                )
                request_parts.append(pooling.pool(i, e, Behaviours(ids, query, by, attribute)))
                request_columns += columns
        return RequestSplit(
            torch.cat(candidate_parts, dim=1),
            torch.cat(request_parts, dim=1),
            index,
            candidate_columns,
            request_columns,
        )

    @property
    def task_keys(self) -> list[str]:
        """Representation names of the tasks: ``task:<name>``."""
        return [f"task:{t.name}" for t in self.tasks]

    def forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> Outputs:
        return self.outputs(self.embed(cat, num, sequences), None, treatment)

    def forward_with_internals(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> tuple[Outputs, Internals]:
        internals = Internals()
        return self.outputs(self.embed(cat, num, sequences), internals, treatment), internals

    def outputs(
        self, x: torch.Tensor, internals: Internals | None, treatment: torch.Tensor | None
    ) -> Outputs:
        """The named outputs of the embedded ``x``: ``head``'s; on uplift data, the S-learner's
        (``s_learner_outputs``)."""
        if not self.s_learner_arms:
            return self.head(x, internals)
        return self.s_learner_outputs(x, internals, treatment)

    def s_learner_outputs(
        self, x: torch.Tensor, internals: Internals | None, treatment: torch.Tensor | None
    ) -> Outputs:
        """``x`` joined by the one-hot of an arm, ``[x ; e_m]``, through the head: in training
        the observed arm's ``logits`` only (what the loss reads); else every arm's,
        ``arm_logits [B, A, T]`` (``internals``: of the control arm's pass), ``logits`` the
        observed arm's (control where ``treatment`` is None)."""
        arms = len(self.s_learner_arms)
        if self.training and treatment is not None:
            one_hot = nn.functional.one_hot(treatment.clamp(min=0), arms).to(x.dtype)
            return self.head(torch.cat([x, one_hot], dim=1), internals)
        eye = torch.eye(arms, dtype=x.dtype, device=x.device)
        rows = torch.zeros_like(x[:, :1])  # [B, 1]: broadcast, no batch size fixed (export)
        arm_logits = torch.stack(
            [
                self.head(torch.cat([x, rows + eye[m]], 1), internals if m == 0 else None)[LOGITS]
                for m in range(arms)
            ],
            dim=1,
        )
        return arm_outputs(arm_logits, treatment)

    def training_forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> tuple[Outputs, dict[str, torch.Tensor]]:
        """The outputs and the model's auxiliary losses (named, weighted, added to the task
        loss): none by default."""
        return self(cat, num, sequences, treatment), {}

    def head(self, x: torch.Tensor, internals: Internals | None) -> Outputs:
        """The named outputs of the embedded input ``x`` ``[B, input_dim]`` (or a
        ``RequestSplit`` of it, where ``splits_request``)."""
        raise NotImplementedError


def arm_outputs(arm_logits: torch.Tensor, treatment: torch.Tensor | None) -> Outputs:
    """An uplift model's outputs from every arm's logits ``[B, A, T]``: those and ``logits``
    ``[B, T]``, the observed arm's (control where ``treatment`` is None or -1, an arm training
    never saw)."""
    if treatment is None:
        return {LOGITS: arm_logits[:, 0], ARM_LOGITS: arm_logits}
    index = treatment.clamp(min=0).view(-1, 1, 1).expand(-1, 1, arm_logits.shape[2])
    return {LOGITS: arm_logits.gather(1, index).squeeze(1), ARM_LOGITS: arm_logits}


class ExpertModel(MultiTaskModel):
    """Experts and gates (MMoE, CGC / PLE, AdaTT, HoME): a stack of ``ExpertLayer``s over the
    embedded ``x``, then one tower per task on the representation ``task:<name>``.

    Subclasses append their layers to ``self.layers`` and call ``add_towers``.
    """

    splits_request = True  # the first layer's matmuls split per part; the rest reads dense x
    compiled_parts = ("towers_on",)  # the layers and towers, whatever the model puts before

    def __init__(self, inputs: InputSpec, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(inputs, tasks)
        self.layers = nn.ModuleList()

    def training_forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        sequences: Sequences = None,
        treatment: torch.Tensor | None = None,
    ) -> tuple[Outputs, dict[str, torch.Tensor]]:
        """With a balance loss (``Routing.balance``): ``balance`` = the mean over top-k gates
        of ``alpha * sum_i f_i P_i``."""
        if not self.routed:
            return self(cat, num, sequences, treatment), {}
        outputs, internals = self.forward_with_internals(cat, num, sequences, treatment)
        return outputs, self.auxiliary_losses(internals)

    @property
    def routed(self) -> bool:
        """Whether a layer has a balance loss (training then records the gates)."""
        return any(layer.routing.balance for layer in self.layers)

    def auxiliary_losses(self, internals: Internals) -> dict[str, torch.Tensor]:
        alpha = {layer.name: layer.routing.balance for layer in self.layers}
        terms = [alpha[k.split("/")[0]] * v for k, v in internals.balance.items()]
        return {"balance": torch.stack(terms).mean()} if terms else {}

    def add_towers(self, hidden: Sequence[int], activation: str, dropout: float = 0.0) -> None:
        """One tower per task; ``dropout`` after each of its hidden layers (training only)."""
        width = self.layers[-1].output_dim
        self.towers = nn.ModuleList(Tower(width, hidden, activation, dropout) for _ in self.tasks)

    def head(self, x: torch.Tensor, internals: Internals | None) -> Outputs:
        return self.towers_on({"x": x}, internals)

    def towers_on(self, reps: dict[str, torch.Tensor], internals: Internals | None) -> Outputs:
        """The layers over the named representations ``reps`` (``x`` and any a model adds),
        then the towers: ``{"logits": [B, T]}``."""
        return {LOGITS: towers_together(self.towers, self.task_representations(reps, internals))}

    def task_representations(
        self, reps: dict[str, torch.Tensor], internals: Internals | None
    ) -> list[torch.Tensor]:
        """The layers over ``reps``: each task's representation ``task:<name>`` ``[B, H]``."""
        for layer in self.layers:
            reps = layer(reps, internals)
        return [reps[k] for k in self.task_keys]
