"""Building blocks of the zoo: the fused embedding, an MLP, a tower, the request split."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

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
            rows = torch.empty(int(sizes.sum()), width)  # written by ``initialise`` or a load
            self.tables.append(nn.Embedding(int(sizes.sum()), width, sparse=True, _weight=rows))
            self.register_buffer(f"columns_{width}", torch.tensor(columns), persistent=False)
            self.register_buffer(f"offsets_{width}", offsets, persistent=False)
        # Rows are drawn chunk by chunk from generators seeded by (this seed, feature, chunk)
        # (``fill_rows``): any rows can be made without the others (a shard of the table).
        self.init_seed, self.init_std = int(torch.randint(0, 2**62, (1,))), init_std
        self.initialised = False
        self.widths = widths
        self.dims, self.cardinalities = tuple(inputs.embedding_dims), tuple(inputs.cardinalities)
        # ``forward`` lays the features out table by table, in feature order within a table.
        order = [f for w in widths for f, d in enumerate(self.dims) if d == w]
        self.output_starts = {f: sum(self.dims[g] for g in order[:k]) for k, f in enumerate(order)}
        self.output_dim = sum(inputs.embedding_dims) + inputs.num_numeric
        # Feature f's (table, first row): for lookups of other ids in its vocabulary.
        self.rows_of = []
        for f, width in enumerate(inputs.embedding_dims):
            before = [i for i, d in enumerate(inputs.embedding_dims[:f]) if d == width]
            start = sum(inputs.cardinalities[i] for i in before)
            self.rows_of.append((widths.index(width), start))
        if not _DEFERRED.get():
            self.initialise()

    def initialise(self) -> None:
        """Every row drawn from N(0, init_std^2) (``fill_rows``), unless already written (by
        this or by loading a state dict)."""
        if self.initialised:
            return
        with torch.no_grad():
            for f, (table, start) in enumerate(self.rows_of):
                rows = self.tables[table].weight[start : start + self.cardinalities[f]]
                shape = (self.cardinalities[f], self.dims[f])
                fill_rows(rows, self.init_seed, f, shape, self.init_std)
        self.initialised = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]
        self.initialised = True

    def per_row(self, values: Sequence[float]) -> list[torch.Tensor]:
        """One value per feature spread over its rows: per table, ``[rows]``."""
        out = []
        for width, table in zip(self.widths, self.tables, strict=True):
            columns, offsets = getattr(self, f"columns_{width}"), getattr(self, f"offsets_{width}")
            sizes = torch.diff(offsets, append=offsets.new_tensor([table.num_embeddings]))
            per_feature = torch.tensor([values[c] for c in columns.tolist()])
            out.append(torch.repeat_interleave(per_feature, sizes))
        return out

    def fetch(self, cat: torch.Tensor, sequences: Mapping[str, torch.Tensor] | None) -> None:
        """Nothing: these tables are read in place (sharded ones fetch the step's rows here,
        ``ranker.sharding.ShardedTables``)."""

    def written(self) -> None:
        """Refuses to read tables left unwritten (``deferred_tables``, then never initialised
        nor loaded)."""
        if not self.initialised:
            raise RuntimeError("embedding tables read before their rows were written: "
                               "initialise() them or load a state dict")  # fmt: skip

    def lookup(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids (any shape) in feature ``feature``'s vocabulary: ``[..., D_f]``."""
        self.written()
        table, start = self.rows_of[feature]
        return self.tables[table](ids + start)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        self.written()
        parts = []
        for width, table in zip(self.widths, self.tables, strict=True):
            columns, offsets = getattr(self, f"columns_{width}"), getattr(self, f"offsets_{width}")
            parts.append(table(cat[:, columns] + offsets).flatten(1))
        parts.append(num)
        return torch.cat(parts, dim=1)

    def output_columns(self, feature: int) -> list[int]:
        """The columns of ``forward``'s output that hold feature ``feature``'s vector."""
        start = self.output_starts[feature]
        return list(range(start, start + self.dims[feature]))

    def embed_columns(
        self, cat: torch.Tensor, features: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """``cat [B, len(features)]`` holding only ``features``' ids: their vectors ``[B, D]``,
        one lookup per table, and the columns of ``forward``'s output they stand for."""
        self.written()
        parts, columns = [], []
        for table in range(len(self.tables)):
            mine = [j for j, f in enumerate(features) if self.rows_of[f][0] == table]
            if not mine:
                continue
            starts = torch.tensor([self.rows_of[features[j]][1] for j in mine])
            parts.append(self.tables[table](cat[:, mine] + starts).flatten(1))
            columns += [c for j in mine for c in self.output_columns(features[j])]
        if not parts:
            return cat.new_zeros((cat.shape[0], 0), dtype=torch.float32), columns
        return torch.cat(parts, dim=1), columns


_DEFERRED: ContextVar[bool] = ContextVar("deferred_tables", default=False)
INIT_CHUNK = 65_536  # rows a generator draws at a time (fewer for a smaller vocabulary)


@contextmanager
def deferred_tables() -> Iterator[None]:
    """``FusedEmbedding``s built inside leave their rows unwritten (allocated, never touched:
    not resident) until ``initialise()`` or a load: tables about to be sharded are then
    initialised shard by shard (``ranker.sharding``), never whole in one process."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def fill_rows(
    out: torch.Tensor,
    seed: int,
    feature: int,
    shape: tuple[int, int],
    std: float,
    first_row: int = 0,
    first_column: int = 0,
) -> None:
    """Writes into ``out [n, d]`` rows ``first_row..+n``, columns ``first_column..+d`` of
    feature ``feature``'s initial table (``shape`` rows x dims): N(0, std^2), each chunk of
    ``INIT_CHUNK`` rows from its own generator seeded by (``seed``, feature, chunk), so any
    part is the same whoever makes it."""
    rows, dims = shape
    chunk = min(INIT_CHUNK, rows)
    done = 0
    while done < out.shape[0]:
        k, at = divmod(first_row + done, chunk)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + feature * 10_007 + k) % 2**63)
        drawn = torch.empty(chunk, dims).normal_(0.0, std, generator=generator)
        take = min(chunk - at, out.shape[0] - done)
        columns = slice(first_column, first_column + out.shape[1])
        out[done : done + take] = drawn[at : at + take, columns]
        done += take


# A categorical feature with more than ``LARGE_VOCABULARY`` ids (the unknown index aside) has a
# large vocabulary (``InputSpec.large_vocabularies``): each of its rows is in few batches. An
# item-side one is the catalogue (``InputSpec.catalogue``): tomorrow brings items unseen today,
# and each item is in few rows. The default rules read them:
# - ``--model.id_dropout auto``: the catalogue's features get ``AUTO_ID_DROPOUT``, for
#   tomorrow's new items, whose ids score through the unknown row; smaller item vocabularies
#   (a category, a type) are left as they are;
# - ``--model.catalogue_learning_rate``: where the catalogue renews (at least ``RENEWING`` of
#   the validation rows hold an item, or another of its ids, with no row of its own:
#   ``renewing``), the rows of all its features learn at that (lower) rate: an item's few
#   rows come back every epoch, and at the rate of the others its row learns them by heart
#   while the model leans on ids that tomorrow's items lack. A catalogue that stays (most
#   items seen in training) keeps the others' rate: there the ids learned by heart are the
#   ones scored (``embedding_rates``);
# - ``--model.small_vocabulary_learning_rate``: the rows of the features that are not large,
#   in nearly every batch, learn at that (lower) rate.
AUTO_ID_DROPOUT, RENEWING = 0.1, 0.2


def check_features(option: str, given: Mapping[str, object], names: Sequence[str]) -> None:
    """``ValueError`` naming the features an option (``given``: name -> value) names that the
    categorical inputs (``names``) lack."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{option} names unknown features {unknown} (known: {list(names)})")


def renewing(inputs: InputSpec) -> list[str]:
    """The catalogue (``InputSpec.catalogue``) if it renews, else ``[]``: it renews where at
    least ``RENEWING`` of the validation rows hold an id of one of its features (the item, in
    practice) with no row of its own (``inputs.cat_unseen``), or where one of them was not
    measured (no validation rows; a hashed feature)."""
    features = list(inputs.catalogue)
    unseen = dict(zip(inputs.cat_names, inputs.cat_unseen, strict=False))
    shares = [unseen.get(n) for n in features]
    return features if any(s is None or s >= RENEWING for s in shares) else []


def auto_id_dropout(inputs: InputSpec) -> dict[str, float]:
    """The ``auto`` rule: ``{feature: 0.1}`` for every feature of ``inputs.catalogue``."""
    return dict.fromkeys(inputs.catalogue, AUTO_ID_DROPOUT)


def embedding_rates(
    inputs: InputSpec,
    large: float,
    small: float | None = None,
    catalogued: float | None = None,
    named: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Each categorical feature's embedding learning rate: ``large`` for a large vocabulary
    (more than 1,000 ids), ``small`` for the others (``None``: ``large``), ``catalogued`` for
    the catalogue's features where it renews (``renewing``; ``None``: as the others); a feature
    ``named`` gets its own."""
    named = dict(named or {})
    check_features("feature_learning_rates", named, inputs.cat_names)
    bad = sorted(n for n, r in named.items() if not r > 0)
    if bad:
        raise ValueError(f"feature_learning_rates must be > 0: {bad}")
    items = set(renewing(inputs)) if catalogued is not None else set()
    rates = {
        name: large if big or small is None else small
        for name, big in zip(inputs.cat_names, inputs.large_vocabularies, strict=True)
    }
    return rates | dict.fromkeys(items, catalogued) | named


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
        check_features("id_dropout", shares, names)
        bad = sorted(n for n, p in shares.items() if not 0 <= p < 1)
        if bad:
            raise ValueError(f"id_dropout shares must be in [0, 1): {bad}")
        kept = [n for n in names if shares.get(n, 0) > 0]
        columns = torch.tensor([names.index(n) for n in kept], dtype=torch.long)
        self.register_buffer("columns", columns, persistent=False)
        self.register_buffer("shares", torch.tensor([shares[n] for n in kept]), persistent=False)

    def forward(self, cat: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """``seed`` (e.g. the run's seed and the step): the rows dropped follow from it alone,
        so a resumed run drops what the uninterrupted one did; else the global generator."""
        if not self.training or not len(self.columns):
            return cat
        shape = (cat.shape[0], len(self.columns))
        if seed is None:
            noise = torch.rand(shape, device=cat.device)
        else:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.rand(shape, generator=generator).to(cat.device)
        drop = noise < self.shares
        dropped = cat.clone()
        dropped[:, self.columns] = cat[:, self.columns].masked_fill(drop, 0)
        return dropped


class HistoryDropout(nn.Module):
    """Training only: behaviours of the sequences ``{name: [B, L]}`` (right-aligned, most
    recent last) replaced by padding (0, masked):

    - each with probability ``share``;
    - with ``recent``, each row's most recent ``k`` too, ``k = floor(u * (2 recent n + 1))``
      (at most ``n``) for ``u ~ U[0, 1)`` and ``n`` the row's behaviours: on average a share
      ``recent`` of them, taken from the recent end.

    Sequences of one length share the draws, so aligned ones (a history and its categories)
    lose the same positions. A history seen whole in training and thinned at serving is a
    shift the model never saw: its latest items are the ones a vocabulary fitted before them
    does not know (``recent``), and a user may have fewer behaviours than training's
    (``share``).
    """

    def __init__(self, share: float, recent: float = 0.0) -> None:
        super().__init__()
        for name, value in (("history_dropout", share), ("history_dropout_recent", recent)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.share, self.recent = share, recent

    def forward(
        self, sequences: dict[str, torch.Tensor], seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``seed``: the positions dropped follow from it alone (as ``IdDropout``)."""
        if not self.training or not (self.share or self.recent) or not sequences:
            return sequences
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        drops: dict[tuple[int, ...], torch.Tensor] = {}
        out = {}
        for name, ids in sequences.items():
            shape = tuple(ids.shape)
            if shape not in drops:
                drops[shape] = self.draw(ids, generator)
            out[name] = ids.masked_fill(drops[shape], 0)
        return out

    def draw(self, ids: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The positions to drop, ``[B, L]`` bool."""
        rows, length = ids.shape
        noise = torch.rand((rows, length + 1), generator=generator).to(ids.device)
        drop = noise[:, :length] < self.share
        if self.recent:
            behaviours = (ids > 0).sum(1)
            k = (noise[:, length] * (2 * self.recent * behaviours + 1)).floor()
            k = torch.minimum(k, behaviours)
            position = torch.arange(length, device=ids.device)
            drop |= position.unsqueeze(0) >= (length - k).unsqueeze(1)
        return drop


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


class RequestSplit:
    """A model input ``x [N, D]`` held as its two parts: the columns that vary per candidate,
    ``candidate [N, D_c]``, and those of the request, ``request [R, D_r]`` (R = 1 for one
    request scoring N candidates, R = N for rows of as many requests), with ``index [N]`` the
    request row of each candidate. ``candidate_columns`` / ``request_columns`` say which
    columns of ``x`` each part holds.

    A linear map of ``x`` splits the same way (the rows of ``W`` taken per part),

        x W + b = candidate W_c + (request W_r + b)[index]

    so the request's share of a first layer is computed R times rather than N (``matmul``);
    ``dense()`` is ``x`` itself, for what is not linear in ``x``. Used by the exported scorer
    (``pipelines.export``), where one user's features meet hundreds of candidates.
    """

    def __init__(
        self,
        candidate: torch.Tensor,
        request: torch.Tensor,
        index: torch.Tensor,
        candidate_columns: Sequence[int],
        request_columns: Sequence[int],
    ) -> None:
        self.candidate, self.request, self.index = candidate, request, index
        self.candidate_columns = torch.tensor(list(candidate_columns), dtype=torch.long)
        self.request_columns = torch.tensor(list(request_columns), dtype=torch.long)
        order = torch.tensor([*candidate_columns, *request_columns], dtype=torch.long)
        self.inverse = torch.argsort(order)
        self._dense: torch.Tensor | None = None

    def matmul(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight (+ bias)`` for ``weight [D, H]``: ``[N, H]``."""
        request = self.request @ weight[self.request_columns]
        if bias is not None:
            request = request + bias
        return self.candidate @ weight[self.candidate_columns] + request.index_select(0, self.index)

    def dense(self) -> torch.Tensor:
        """``x [N, D]`` (built once)."""
        if self._dense is None:
            rows = self.request.index_select(0, self.index)
            self._dense = torch.cat([self.candidate, rows], dim=1)[:, self.inverse]
        return self._dense


def as_dense(x: torch.Tensor | RequestSplit) -> torch.Tensor:
    return x.dense() if isinstance(x, RequestSplit) else x


def linear(x: torch.Tensor | RequestSplit, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``, split per part when ``x`` is a ``RequestSplit``."""
    return x.matmul(layer.weight.T, layer.bias) if isinstance(x, RequestSplit) else layer(x)


def towers_together(towers: Sequence[Tower], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every task's tower on its own input ``[B, D]`` at once: each layer one batched matmul
    over the towers' weights (stacked at each call, the parameters stay per task), the same
    logits ``[B, T]`` as ``torch.stack([t(x) for t, x in zip(towers, inputs)], 1)``."""
    h = torch.stack(list(inputs))  # [T, B, D]
    layers = zip(*([*tower[0], tower[1]] for tower in towers), strict=True)
    for same in layers:  # the k-th module of every tower
        if isinstance(same[0], nn.Linear):
            weight = torch.stack([m.weight for m in same]).transpose(1, 2)  # [T, D, H]
            bias = torch.stack([m.bias for m in same]).unsqueeze(1)  # [T, 1, H]
            h = torch.baddbmm(bias, h, weight)
        else:  # the activation, or dropout: the same module kind in every tower
            h = same[0](h)
    return h.squeeze(-1).T
