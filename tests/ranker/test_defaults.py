"""The default rules: row-wise Adagrad for the embedding tables, id dropout on large item
vocabularies, a lower learning rate for the rows of small vocabularies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from features.state import InputSpec
from ranker.layers import FusedEmbedding, auto_id_dropout, embedding_rates, renewing
from ranker.models import MMoE
from ranker.module import EMBEDDING_OPTIMIZERS, RankerModule, RowRates, RowWiseAdagrad
from tests.ranker.common import SMALL, TASKS


def test_rowwise_adagrad_is_one_accumulator_per_row_and_moves_only_the_batch_rows() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4, sparse=True)
    reference = table.weight.detach().clone()
    accumulated = torch.zeros(10)
    optimizer = RowWiseAdagrad(table.parameters(), lr=0.1)
    for step in range(3):
        ids = torch.tensor([1, 3, 3, 7]) + step % 2  # rows 1, 3, 7 then 2, 4, 8, then again
        out = table(ids)
        optimizer.zero_grad()
        ((out * torch.arange(4.0)).sum() + out.pow(2).sum()).backward()
        grad = table.weight.grad.to_dense()
        rows = ids.unique()
        accumulated[rows] += grad[rows].pow(2).mean(1)
        step_size = 0.1 / (accumulated[rows].sqrt().unsqueeze(1) + 1e-8)
        reference[rows] -= step_size * grad[rows]
        optimizer.step()
        torch.testing.assert_close(table.weight.detach(), reference)
    (state,) = optimizer.state.values()
    assert state["sum"].shape == (10,)  # one float per row
    untouched = [0, 5, 6, 9]
    assert (state["sum"][untouched] == 0).all()


def spec(item_ids: int, user_ids: int = 5_000) -> InputSpec:
    return InputSpec(
        ("user", "item", "category"),
        (user_ids + 1, item_ids + 1, 31),
        (8, 8, 4),
        ("age",),
        cat_sides=("user", "item", "item"),
    )


def test_auto_id_dropout_takes_large_item_vocabularies_only() -> None:
    assert auto_id_dropout(spec(50_000)) == {"item": 0.1}  # not the users, not the category
    assert auto_id_dropout(spec(1_001)) == {"item": 0.1}
    assert auto_id_dropout(spec(1_000)) == {}  # a small catalogue: every id well trained
    old = InputSpec(("item",), (50_001,), (8,), ())  # a checkpoint from before sides: none
    assert auto_id_dropout(old) == {}


def module(**options) -> RankerModule:
    return RankerModule(
        lambda inputs, tasks: MMoE(inputs, tasks, num_experts=2, **SMALL),
        inputs=spec(50_000),
        tasks=TASKS,
        **options,
    )


def test_the_module_resolves_auto_and_takes_what_it_is_given() -> None:
    assert module().id_dropout_shares == {"item": 0.1}  # the default: auto
    assert module(id_dropout={}).id_dropout_shares == {}
    assert module(id_dropout={"user": 0.2}).id_dropout_shares == {"user": 0.2}


def test_id_dropout_draws_follow_the_seed_alone() -> None:
    """A run resumed mid-epoch drops the ids the uninterrupted run dropped at that step."""
    from ranker.layers import IdDropout

    dropout = IdDropout(("user", "item"), {"item": 0.5}).train()
    cat = torch.randint(1, 100, (256, 2))
    torch.manual_seed(1)
    first = dropout(cat, seed=42)
    torch.manual_seed(2)  # the global generator does not matter
    assert torch.equal(dropout(cat, seed=42), first)
    assert not torch.equal(dropout(cat, seed=43), first)
    assert torch.equal(first[:, 0], cat[:, 0]) and 0.3 < (first[:, 1] == 0).float().mean() < 0.7


def test_embedding_rates_follow_the_vocabulary() -> None:
    assert embedding_rates(spec(50_000, user_ids=1_000), 0.05, 0.001) == {
        "user": 0.001,  # 1,000 ids: in nearly every batch
        "item": 0.05,
        "category": 0.001,
    }
    assert embedding_rates(spec(50_000, user_ids=1_001), 0.05, 0.001)["user"] == 0.05
    assert set(embedding_rates(spec(50_000), 0.05, None).values()) == {0.05}  # the rule off


@pytest.mark.parametrize("name", sorted(EMBEDDING_OPTIMIZERS))
def test_row_rates_step_each_row_at_its_own_rate(name: str) -> None:
    """Every row of a fused table steps exactly as the same optimiser run at that row's rate."""
    torch.manual_seed(0)
    inputs = spec(30, user_ids=20)  # user rows 0-20, item rows 21-51 in the 8-wide table
    fused = FusedEmbedding(inputs)
    optimiser_of = EMBEDDING_OPTIMIZERS[name]
    rates = {"user": 0.001, "item": 0.05, "category": 0.01}
    scales = [rates[n] / 0.05 for n in inputs.cat_names]
    mixed = RowRates(
        fused.tables, fused.per_row(scales), optimiser_of is EMBEDDING_OPTIMIZERS["adam"]
    )
    optimiser = optimiser_of(fused.parameters(), lr=0.05)
    alone = {}  # one copy per rate, stepped at that rate by a plain optimiser
    for rate in set(rates.values()):
        copy = FusedEmbedding(inputs)
        copy.load_state_dict(fused.state_dict())
        alone[rate] = (copy, optimiser_of(copy.parameters(), lr=rate))
    for step in range(3):
        cat = torch.randint(0, 20, (16, 3)) + torch.tensor([0, step, 0])
        num = torch.zeros(16, 1)
        for embedding, opt in [(fused, optimiser), *alone.values()]:
            opt.zero_grad()
            embedding(cat, num).pow(2).sum().backward()
        mixed.step(optimiser)
        for _, opt in alone.values():
            opt.step()
    for f, name_ in enumerate(inputs.cat_names):
        table, start = fused.rows_of[f]
        rows = slice(start, start + inputs.cardinalities[f])
        expected = alone[rates[name_]][0].tables[table].weight[rows]
        torch.testing.assert_close(fused.tables[table].weight[rows], expected)


def test_row_rates_cost_nothing_where_every_row_has_the_same_rate() -> None:
    fused = FusedEmbedding(spec(50_000))
    assert RowRates(fused.tables, fused.per_row([1.0, 1.0, 1.0]), False).parts == []


def test_the_catalogue_learns_at_its_own_rate() -> None:
    """Item-side features over 1,000 ids (the ones id dropout picks) and no other."""
    rates = embedding_rates(spec(50_000), 0.05, catalogued=0.01)
    assert rates == {"user": 0.05, "item": 0.01, "category": 0.05}
    assert set(embedding_rates(spec(1_000), 0.05, catalogued=0.01).values()) == {0.05}
    assert embedding_rates(spec(50_000), 0.05)["item"] == 0.05  # the rule off


def test_the_catalogue_takes_its_rate_only_where_it_renews() -> None:
    """At least 20 % of validation rows with an item the table has no row for: it renews, and
    every feature of the catalogue (the author too, whose ids mostly stay) takes the rate."""
    two = InputSpec(
        ("user", "item", "author", "category"),
        (5_001, 50_001, 5_001, 31),
        (8, 8, 8, 4),
        (),
        cat_sides=("user", "item", "item", "item"),
    )

    def measured(item: float, author: float | None = 0.01) -> InputSpec:
        return dataclasses.replace(two, cat_unseen=(0.0, item, author, 0.9))

    assert renewing(measured(0.2)) == ["item", "author"]
    assert renewing(measured(0.01, author=0.3)) == ["item", "author"]  # any of its features
    assert renewing(measured(0.19)) == []  # a catalogue that stays: its ids are the ones scored
    assert renewing(two) == ["item", "author"]  # not measured (no validation rows): as before
    assert renewing(measured(0.01, author=None)) == ["item", "author"]  # hashed: not measured
    rates = embedding_rates(measured(0.53), 0.05, catalogued=0.01)
    assert rates == {"user": 0.05, "item": 0.01, "author": 0.01, "category": 0.05}
    # the category's unseen share is no matter: it is not the catalogue (30 ids)
    assert set(embedding_rates(measured(0.08), 0.05, catalogued=0.01).values()) == {0.05}


def test_a_named_feature_gets_its_own_rate_over_the_rules() -> None:
    rates = embedding_rates(spec(50_000, user_ids=1_000), 0.05, 0.001, 0.01, {"item": 0.02})
    assert rates == {"user": 0.001, "item": 0.02, "category": 0.001}
    assert embedding_rates(spec(50_000), 0.05, named={"user": 0.2})["user"] == 0.2
    with pytest.raises(ValueError, match=r"unknown features \['video'\]"):
        embedding_rates(spec(50_000), 0.05, named={"video": 0.01})
    with pytest.raises(ValueError, match=r"must be > 0: \['item'\]"):
        embedding_rates(spec(50_000), 0.05, named={"item": 0.0})


def test_the_module_steps_the_catalogue_at_its_rate() -> None:
    """``RankerModule``'s options reach the rates its optimiser scales each row by."""
    rates = module(catalogue_learning_rate=0.01, feature_learning_rates={"user": 0.02})
    assert rates.embedding_rates == {"user": 0.02, "item": 0.01, "category": 0.05}
