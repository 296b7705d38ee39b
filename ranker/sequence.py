"""Sequence pooling: a user's recent behaviours as one vector per sequence feature, shared by
every model of the zoo.

A sequence's ids ``[B, L]`` (0 = padding or unknown, masked) are embedded with the rows of the
categorical feature whose vocabulary they share (``vocabulary``), so a history item and the
same item as a candidate have one embedding ``e``. Pooling, per feature:

- ``mean``: ``v = sum_j m_j e_j / max(sum_j m_j, 1)``;
- ``target_attention`` (DIN, Zhou et al., KDD 2018): with the query ``q`` the embedding of the
  candidate's ``target`` feature,

      a_j = MLP([e_j, q, e_j - q, e_j * q])            # a scalar score per position
      w   = softmax_j(a_j over unmasked j) * m_j
      v   = sum_j w_j e_j

- ``search`` (a general search unit, then target attention: SIM, Pi et al., CIKM 2020; TWIN,
  Chang et al., KDD 2023), for histories of thousands: the ``K`` positions most relevant to
  the candidate are kept, ``S = topK_j r_j`` over unmasked ``j``, and ``v`` is the target
  attention above over ``j in S`` only. Relevance ``r_j``:

      hard search (``search_by``: a sequence b aligned with the history, e.g. its authors,
      and the candidate's value c of b's feature):   r_j = j if b_j = c != 0, else excluded
                                                      (the latest K sharing the attribute)
      soft search (otherwise):                        r_j = <e_j, q>   (no gradient: the
                                                      search picks, the attention learns)

  Only the K kept are embedded with a gradient, so a step costs the lookup of L ids (soft
  search; none for hard) plus target attention over K, not over L. Fewer than K relevant
  behaviours leave the rest masked.

An empty (or all-unknown) history gives ``v = 0``, never NaN. The pooled vectors are
concatenated after the embedded input: ``[B, sum D_s]`` (a sequence with pooling ``none``,
only searched by, adds nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from features.config import ATTENDED
from features.state import InputSpec, SequenceInput
from ranker.layers import FusedEmbedding


class TargetAttention(nn.Module):
    """DIN's activation unit: a score per history position from ``[e, q, e - q, e * q]``.

    The first layer is linear in that concatenation, ``W [e; q; e - q; e * q] =
    (W_e + W_d) e + (W_q - W_d) q + W_p (e * q)``: the ``q`` term is computed once per row,
    not once per position, and only ``[e; e * q]`` is built per position (the same function
    as the MLP over the concatenation, at about half its cost).
    """

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.dim = dim
        # No bias on the score: the softmax over positions ignores a constant.
        self.mlp = nn.Sequential(
            nn.Linear(4 * dim, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False)
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Checkpoints before 2026-12-01 hold that bias (it never changed a score).
        state_dict.pop(f"{prefix}mlp.2.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def scores(self, e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``MLP([e_j, q, e_j - q, e_j * q])`` for every position: ``[B, L]``."""
        first, activation, last = self.mlp
        d, w = self.dim, first.weight  # slices, not split: the exporter folds them
        w_e, w_q, w_d, w_p = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        per_row = q @ (w_q - w_d).T + first.bias  # [B, H]
        per_position = torch.cat([e, e * q.unsqueeze(1)], dim=-1) @ torch.cat([w_e + w_d, w_p], 1).T
        return last(activation(per_position + per_row.unsqueeze(1))).squeeze(-1)

    def forward(self, e: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.scores(e, q).masked_fill(~mask, -1e9), dim=-1) * mask
        return (weights.unsqueeze(-1) * e).sum(1)


class Behaviours(NamedTuple):
    """What pooling one sequence reads for each row: its ids ``[B, L]``, the candidate's
    ``target`` ids ``[B]`` (the attention's query; soft search), and for hard search the
    aligned sequence ``by [B, L]`` and the candidate's ``key [B]`` to match in it.

    With ``index [B]`` (the exported scorer: ``features.contract.RequestLayout``), ``ids`` and
    ``by`` are the requests' ``[R, L]`` and row ``b`` reads request ``index[b]``'s: a soft
    search then looks its history up once per request, not once per candidate."""

    ids: torch.Tensor
    target: torch.Tensor | None = None
    by: torch.Tensor | None = None
    key: torch.Tensor | None = None
    index: torch.Tensor | None = None


def search(
    ids: torch.Tensor,
    k: int,
    relevance: torch.Tensor,
) -> torch.Tensor:
    """The ids ``[B, k]`` at each row's ``k`` most relevant positions (``relevance [B, L]``,
    ``-inf`` where a position may not be kept), 0 where a row has fewer."""
    top, index = relevance.topk(k, dim=1)
    return ids.gather(1, index).masked_fill(top == float("-inf"), 0)


class SequencePooling(nn.Module):
    """Every sequence feature of ``inputs`` pooled to one vector, concatenated ``[B, D_seq]``.

    Holds no embedding of its own: it reads the model's ``FusedEmbedding`` (passed in
    ``forward``), whose sparse rows stay with the sparse optimiser.
    """

    def __init__(self, inputs: InputSpec, attention_hidden: int = 32) -> None:
        super().__init__()
        names = list(inputs.cat_names)
        self.specs: tuple[SequenceInput, ...] = inputs.sequences
        by_name = {s.name: s for s in self.specs}
        self.vocabulary = [names.index(s.vocabulary) for s in self.specs]
        self.target = [names.index(s.target) if s.target else -1 for s in self.specs]
        # Hard search: the candidate's column of the searched-by sequence's feature.
        self.key = [
            names.index(by_name[s.search_by].vocabulary) if s.search_by else -1 for s in self.specs
        ]
        dims = [inputs.embedding_dims[i] for i in self.vocabulary]
        self.attention = nn.ModuleDict(
            {
                s.name: TargetAttention(d, attention_hidden)
                for s, d in zip(self.specs, dims, strict=True)
                if s.pooling in ATTENDED
            }
        )
        # Pooled to a vector each (a sequence with pooling: none is only searched by).
        self.pooled = [i for i, s in enumerate(self.specs) if s.pooling != "none"]
        dims = [d if s.pooling != "none" else 0 for s, d in zip(self.specs, dims, strict=True)]
        self.dims = dims
        self.output_dim = sum(dims)
        # False: the pooled histories read the shared embeddings without training them (the
        # candidates alone do); the attention units still learn.
        self.trains_embeddings = True

    def index(self, name: str) -> int:
        """The position of sequence ``name`` among the pooled ones."""
        return [s.name for s in self.specs].index(name)

    def relevant(self, i: int, embedding: FusedEmbedding, rows: Behaviours) -> torch.Tensor:
        """Sequence ``i``'s ids that its pooling reads: all ``[B, L]``, or with ``search``
        the ``K`` most relevant to each row's candidate."""
        spec, (requests, target, by, key, index) = self.specs[i], rows
        ids = requests if index is None else requests.index_select(0, index)
        if spec.pooling != "search" or spec.search_k >= ids.shape[1]:
            return ids
        keep = ids > 0
        if spec.search_by:
            assert by is not None and key is not None
            by = by if index is None else by.index_select(0, index)
            position = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
            shared = keep & (by == key.unsqueeze(1)) & (by > 0)
            relevance = position.expand(ids.shape).masked_fill(~shared, float("-inf"))
        else:
            with torch.no_grad():
                e = embedding.lookup(self.vocabulary[i], requests)  # [R or B, L, D]
                e = e if index is None else e.index_select(0, index)  # [B, L, D]
                q = embedding.lookup(self.target[i], target)  # [B, D]
                relevance = (e @ q.unsqueeze(-1)).squeeze(-1).float()
            relevance = relevance.masked_fill(~keep, float("-inf"))
        return search(ids, spec.search_k, relevance)

    def embed(self, i: int, embedding: FusedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        """Sequence ``i``'s behaviours embedded ``[B, L, D]`` (without training the shared
        rows where ``trains_embeddings`` is off)."""
        e = embedding.lookup(self.vocabulary[i], ids)
        return e if self.trains_embeddings else e.detach()

    def pool(self, i: int, embedding: FusedEmbedding, rows: Behaviours) -> torch.Tensor:
        """Sequence ``i``'s vector ``[B, D]`` (with attention, ``rows.target`` is the
        query)."""
        spec, target = self.specs[i], rows.target
        ids = self.relevant(i, embedding, rows)
        e = self.embed(i, embedding, ids)  # [B, L or K, D]
        mask = ids > 0
        if spec.name in self.attention:
            query = embedding.lookup(self.target[i], target)
            query = query if self.trains_embeddings else query.detach()
            return self.attention[spec.name](e, query, mask)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(e.dtype)
        return (mask.unsqueeze(-1).to(e.dtype) * e).sum(1) / count

    def inputs_of(
        self, i: int, cat: torch.Tensor, sequences: dict[str, torch.Tensor]
    ) -> Behaviours:
        """Sequence ``i``'s behaviours from a model's inputs."""
        spec, target, key = self.specs[i], self.target[i], self.key[i]
        return Behaviours(
            sequences[spec.name],
            cat[:, target] if target >= 0 else None,
            sequences[spec.search_by] if spec.search_by else None,
            cat[:, key] if key >= 0 else None,
        )

    def forward(
        self,
        embedding: FusedEmbedding,
        cat: torch.Tensor,
        sequences: dict[str, torch.Tensor],
    ) -> list[torch.Tensor]:
        return [self.pool(i, embedding, self.inputs_of(i, cat, sequences)) for i in self.pooled]
