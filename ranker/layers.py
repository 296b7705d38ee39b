"""Building blocks of the zoo: the fused embedding, an MLP, a tower, the gated mix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from features.state import InputSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU}


class FusedEmbedding(nn.Module):
    """All categorical features in one table per embedding width, with per-feature row offsets.

    Feature ``f``'s local index ``i`` (0 = unknown) reads row ``offset[f] + i``. Gradients are
    sparse, so a step touches only the rows in the batch whatever the vocabulary size. Features
    sharing a width share a table (usually there is one); the output concatenates every
    feature's vector, then the numeric inputs.
    """

    def __init__(self, inputs: InputSpec, init_std: float = 0.01) -> None:
        super().__init__()
        self.tables = nn.ModuleList()
        widths = sorted(set(inputs.embedding_dims))
        for width in widths:
            columns = [i for i, d in enumerate(inputs.embedding_dims) if d == width]
            sizes = torch.tensor([inputs.cardinalities[i] for i in columns])
            offsets = torch.cumsum(sizes, 0) - sizes
            table = nn.Embedding(int(sizes.sum()), width, sparse=True)
            nn.init.normal_(table.weight, std=init_std)
            self.tables.append(table)
            self.register_buffer(f"columns_{width}", torch.tensor(columns), persistent=False)
            self.register_buffer(f"offsets_{width}", offsets, persistent=False)
        self.widths = widths
        self.output_dim = sum(inputs.embedding_dims) + inputs.num_numeric
        # Feature f's (table, first row): for lookups of other ids in its vocabulary.
        self.rows_of = []
        for f, width in enumerate(inputs.embedding_dims):
            before = [i for i, d in enumerate(inputs.embedding_dims[:f]) if d == width]
            start = sum(inputs.cardinalities[i] for i in before)
            self.rows_of.append((widths.index(width), start))

    def lookup(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids (any shape) in feature ``feature``'s vocabulary: ``[..., D_f]``."""
        table, start = self.rows_of[feature]
        return self.tables[table](ids + start)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        parts = []
        for width, table in zip(self.widths, self.tables, strict=True):
            columns, offsets = getattr(self, f"columns_{width}"), getattr(self, f"offsets_{width}")
            parts.append(table(cat[:, columns] + offsets).flatten(1))
        parts.append(num)
        return torch.cat(parts, dim=1)


class IdDropout(nn.Module):
    """Training only: each row's id of feature ``f`` replaced by the unknown index 0 with
    probability ``p_f``, ``[B, F_cat] -> [B, F_cat]``.

    Ids never seen in training (tomorrow's new items) score through the unknown row; without
    dropout that row learns only from the rare ids folded into it (``min_count``), which
    behave unlike new ones. With it, the unknown row learns the average id. Sequences keep
    their ids (only the feature's own column is dropped).
    """

    def __init__(self, names: Sequence[str], shares: Mapping[str, float]) -> None:
        super().__init__()
        unknown = sorted(set(shares) - set(names))
        if unknown:
            raise ValueError(f"id_dropout names unknown features {unknown} (known: {list(names)})")
        bad = sorted(n for n, p in shares.items() if not 0 <= p < 1)
        if bad:
            raise ValueError(f"id_dropout shares must be in [0, 1): {bad}")
        kept = [n for n in names if shares.get(n, 0) > 0]
        columns = torch.tensor([names.index(n) for n in kept], dtype=torch.long)
        self.register_buffer("columns", columns, persistent=False)
        self.register_buffer("shares", torch.tensor([shares[n] for n in kept]), persistent=False)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        if not self.training or not len(self.columns):
            return cat
        drop = torch.rand(cat.shape[0], len(self.columns), device=cat.device) < self.shares
        dropped = cat.clone()
        dropped[:, self.columns] = cat[:, self.columns].masked_fill(drop, 0)
        return dropped


class MLP(nn.Sequential):
    """Linear layers with an activation (and optional BatchNorm / dropout) after each."""

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(input_dim, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            input_dim = width
        super().__init__(*layers)
        self.output_dim = input_dim


class Tower(nn.Sequential):
    """A task's head: an MLP (dropout after each hidden layer) down to one logit."""

    def __init__(
        self, input_dim: int, hidden: Sequence[int], activation: str = "relu", dropout: float = 0.0
    ) -> None:
        mlp = MLP(input_dim, hidden, activation, dropout)
        super().__init__(mlp, nn.Linear(mlp.output_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum: weights [B, E], expert outputs [B, E, D] -> [B, D]."""
    return (weights.unsqueeze(-1) * experts).sum(1)
