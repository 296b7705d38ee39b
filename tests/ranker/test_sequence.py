"""Sequence pooling (ranker/sequence.py), shared by every model of the zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from features.state import InputSpec, SequenceInput
from ranker.loss import masked_bce
from ranker.models import MultiTaskModel, build
from ranker.sequence import Behaviours
from tests.conftest import CONFIGS
from tests.ranker.common import (
    INPUTS,
    ITEM,
    SEQ_INPUTS,
    TASKS,
    batch,
    model_configs,
    network_config,
    sequences,
)

MODEL_CONFIGS = model_configs(CONFIGS / "model")


def model_of(path: Path, inputs: InputSpec = SEQ_INPUTS) -> MultiTaskModel:
    network = network_config(path)
    hidden = {"bottom_hidden": [16, 8]} if "shared_bottom" in path.name else {}
    hidden = hidden or {"expert_hidden": [16, 8]}
    return build(network, inputs, TASKS, tower_hidden=[8], **hidden)


@pytest.mark.parametrize(
    "path", MODEL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS / "model").with_suffix("").as_posix()
)
def test_every_zoo_model_trains_with_sequences(path: Path) -> None:
    """The loss falls, and the attention unit and the history rows of the shared embedding
    receive gradient, in every model without code of its own."""
    torch.manual_seed(0)
    model = model_of(path)
    cat, num = batch(256, seed=1)
    seqs = sequences(256, seed=1)
    labels = (seqs["clicked"][:, -1:] % 2).float().expand(-1, len(TASKS)).contiguous()
    dense = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    sparse = list(model.embedding.parameters())
    optimisers = [torch.optim.Adam(dense, lr=1e-2), torch.optim.SparseAdam(sparse, lr=5e-2)]
    losses = []
    for step in range(40):
        for o in optimisers:
            o.zero_grad()
        loss, _ = masked_bce(model(cat, num, seqs)["logits"], labels, torch.ones(len(TASKS)))
        loss.backward()
        if step == 0:
            attention = model.pooling.attention["clicked"].mlp[0].weight.grad
            assert attention is not None and attention.abs().sum() > 0
        for o in optimisers:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_empty_and_unknown_histories_are_finite_with_finite_gradients() -> None:
    model = model_of(CONFIGS / "model" / "home.yaml")
    cat, num = batch(8)
    for seqs in (
        {s.name: torch.zeros(8, s.max_len, dtype=torch.int64) for s in SEQ_INPUTS.sequences},
        sequences(8, empty_every=1),
    ):
        logits = model(cat, num, seqs)["logits"]
        assert torch.isfinite(logits).all()
        logits.sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad.to_dense()).all(), name
    pooled = model.pooling(model.embedding, cat, seqs)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in pooled)  # empty: a zero vector


def test_mean_pooling_and_masks() -> None:
    model = model_of(CONFIGS / "model" / "mmoe.yaml").eval()
    cat, _ = batch(5)
    seqs = sequences(5, seed=2, empty_every=100)
    attention, mean, *_searched = model.pooling(model.embedding, cat, seqs)
    ids = seqs["viewed"]
    table = model.embedding.lookup(ITEM, ids)
    for row in range(5):
        kept = ids[row] > 0
        expected = table[row][kept].mean(0) if kept.any() else torch.zeros(table.shape[-1])
        torch.testing.assert_close(mean[row], expected)
    # The history item embeds as the same item does as a candidate: one table, shared rows.
    item = cat[:, ITEM]
    torch.testing.assert_close(
        model.embedding.lookup(ITEM, item), model.embedding(cat, _)[:, 12:20], check_dtype=False
    )
    # Padding and unknown ids are masked: moving the padding or adding more changes nothing.
    clicked = seqs["clicked"]
    longer = torch.cat([torch.zeros(5, 3, dtype=torch.int64), clicked], 1)
    wider = SequenceInput("clicked", "item", 9, "target_attention", "item")
    other = InputSpec(*SEQ_INPUTS.__dict__.values())
    other = InputSpec(**{**other.__dict__, "sequences": (wider, *SEQ_INPUTS.sequences[1:])})
    twin = build(
        {"class_path": "ranker.models.MMoE"}, other, TASKS, expert_hidden=[16, 8], tower_hidden=[8]
    )
    twin.load_state_dict(model.state_dict())
    again, *_searched = twin.pooling(twin.embedding, cat, {**seqs, "clicked": longer})
    torch.testing.assert_close(again, attention)


def test_target_attention_is_the_mlp_over_the_din_concatenation() -> None:
    """The factored first layer computes exactly ``MLP([e, q, e - q, e * q])``."""
    torch.manual_seed(0)
    model = model_of(CONFIGS / "model" / "mmoe.yaml")
    unit = model.pooling.attention["clicked"]
    e, q = torch.randn(6, 5, 8), torch.randn(6, 8)
    qe = q.unsqueeze(1).expand_as(e)
    naive = unit.mlp(torch.cat([e, qe, e - qe, e * qe], dim=-1)).squeeze(-1)
    torch.testing.assert_close(unit.scores(e, q), naive)


def test_attention_scores_have_no_bias_and_older_checkpoints_still_load() -> None:
    """A constant added to every score is lost in the softmax over positions: the score layer
    has no bias, and a state dict from before (with that bias) loads with the same output."""
    torch.manual_seed(0)
    model = model_of(CONFIGS / "model" / "mmoe.yaml")
    unit = model.pooling.attention["clicked"]
    assert unit.mlp[2].bias is None
    e, q, mask = torch.randn(6, 5, 8), torch.randn(6, 8), torch.rand(6, 5) > 0.3
    before = unit(e, q, mask)
    older = {**unit.state_dict(), "mlp.2.bias": torch.tensor([3.0])}
    unit.load_state_dict(older)
    torch.testing.assert_close(unit(e, q, mask), before)


def search_model() -> MultiTaskModel:
    return model_of(CONFIGS / "model" / "mmoe.yaml").eval()


LONG, BY_HOUR = ([s.name for s in SEQ_INPUTS.sequences].index(name) for name in ("long", "by_hour"))
HOUR = INPUTS.cat_names.index("hour")


def test_soft_search_keeps_the_k_behaviours_closest_to_the_candidate() -> None:
    """A planted case: four history items embedded near the candidate, the rest away from
    it; the search keeps exactly those four, wherever they sit in the history."""
    model = search_model()
    index, offset = model.embedding.rows_of[ITEM]
    table = model.embedding.tables[index].weight
    with torch.no_grad():
        table[offset + 1 : offset + 60] = -torch.rand(59, table.shape[1]).abs() - 0.1
        table[offset + 7] = torch.ones(table.shape[1])  # the candidate
        for item, scale in ((11, 0.9), (12, 0.8), (13, 0.7), (14, 0.6)):
            table[offset + item] = scale * torch.ones(table.shape[1])
    history = torch.tensor([[0, 0, 20, 12, 21, 22, 14, 23, 11, 24, 13, 25]])
    kept = model.pooling.relevant(LONG, model.embedding, Behaviours(history, torch.tensor([7])))
    assert sorted(kept[0].tolist()) == [11, 12, 13, 14]
    # Fewer valid behaviours than K: all kept, padding stays padding.
    short = torch.tensor([[0] * 10 + [20, 12]])
    kept = model.pooling.relevant(LONG, model.embedding, Behaviours(short, torch.tensor([7])))
    assert sorted(kept[0].tolist()) == [0, 0, 12, 20]


def test_hard_search_keeps_the_latest_k_sharing_the_candidates_attribute() -> None:
    model = search_model()
    items = torch.arange(1, 13).unsqueeze(0)  # item j + 1 at position j
    hours = torch.tensor([[5, 3, 5, 5, 0, 5, 9, 5, 3, 5, 5, 2]])  # hour 0: unknown
    key = torch.tensor([5])
    kept = model.pooling.relevant(
        BY_HOUR, model.embedding, Behaviours(items, items[:, -1], hours, key)
    )
    assert sorted(kept[0].tolist()) == [6, 8, 10, 11]  # the latest four at hour 5
    # Fewer matches than K: the rest masked; none: an empty history, pooled to zero.
    kept = model.pooling.relevant(
        BY_HOUR, model.embedding, Behaviours(items, items[:, -1], hours, key * 0 + 3)
    )
    assert sorted(kept[0].tolist()) == [0, 0, 2, 9]
    none = model.pooling.relevant(
        BY_HOUR, model.embedding, Behaviours(items, items[:, -1], hours, key * 0 + 7)
    )
    assert none.eq(0).all()
    cat = torch.zeros(1, len(INPUTS.cat_names), dtype=torch.int64)
    cat[0, ITEM], cat[0, HOUR] = 4, 7
    seqs = {s.name: torch.zeros(1, s.max_len, dtype=torch.int64) for s in SEQ_INPUTS.sequences}
    seqs |= {"by_hour": items, "long_hours": hours}
    pooled = model.pooling(model.embedding, cat, seqs)
    assert len(pooled) == len(SEQ_INPUTS.sequences) - 1  # long_hours is only searched by
    assert torch.equal(pooled[-1], torch.zeros_like(pooled[-1]))  # by_hour: nothing at hour 7


def test_search_over_at_most_k_behaviours_is_target_attention_over_them() -> None:
    """When a history holds no more than K behaviours, search keeps them all: the pooled
    vector is the target attention over the whole history (same weights)."""
    model = search_model()
    cat, _ = batch(16, seed=4)
    ids = sequences(16, seed=5)["long"]
    ids[:, : 12 - 4] = 0  # at most K = 4 behaviours, right-aligned
    unit, spec = model.pooling.attention["long"], SEQ_INPUTS.sequences[LONG]
    searched = model.pooling.pool(LONG, model.embedding, Behaviours(ids, cat[:, ITEM]))
    e = model.embedding.lookup(ITEM, ids)
    whole = unit(e, model.embedding.lookup(ITEM, cat[:, ITEM]), ids > 0)
    torch.testing.assert_close(searched, whole)
    assert spec.search_k == 4 and (ids > 0).sum(1).max() == 4


@pytest.mark.parametrize("model", ["mmoe", "aw_moe"])  # AW-MoE's gates read a history too
def test_histories_can_read_the_shared_embeddings_without_training_them(model: str) -> None:
    """``history_trains_embeddings: false``: a step moves no embedding row that only a
    history read (the candidates' rows still train), and the attention units still learn."""
    from ranker.module import RankerModule

    network = network_config(CONFIGS / "model" / f"{model}.yaml")
    cat, num = batch(16, seed=3)
    seqs = sequences(16, seed=3, empty_every=100)
    candidates = set(cat[:, ITEM].tolist())
    for trains in (True, False):
        torch.manual_seed(0)
        module = RankerModule(
            lambda i, t, n=network: build(n, i, t, expert_hidden=[16, 8], tower_hidden=[8]),
            inputs=SEQ_INPUTS,
            tasks=TASKS,
            history_trains_embeddings=trains,
        )
        module.network(cat, num, seqs)["logits"].sum().backward()
        index, start = module.network.embedding.rows_of[ITEM]
        grad = module.network.embedding.tables[index].weight.grad.to_dense()
        moved = {r - start for r in grad.abs().sum(1).nonzero().flatten().tolist()}
        moved &= set(range(1, INPUTS.cardinalities[ITEM]))
        history_only = {int(i) for s in ("clicked", "viewed") for i in seqs[s].flatten()} - {0}
        history_only -= candidates
        assert (moved & history_only) if trains else not (moved & history_only)
        assert moved >= candidates - {0}
        attention = module.network.pooling.attention["clicked"].mlp[0].weight.grad
        assert attention is not None and attention.abs().sum() > 0
