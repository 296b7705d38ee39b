"""The default rules: row-wise Adagrad for the embedding tables, id dropout on large item
vocabularies."""

from __future__ import annotations

import torch

from features.state import InputSpec
from ranker.layers import auto_id_dropout
from ranker.models import MMoE
from ranker.module import RankerModule, RowWiseAdagrad
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
