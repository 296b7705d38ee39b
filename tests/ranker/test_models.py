"""The zoo's contract: one signature, sparse embedding gradients, learning on a few steps."""

from __future__ import annotations

import math

import pytest
import torch

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import ExpertPool
from ranker.layers import FusedEmbedding, HistoryDropout, IdDropout
from ranker.loss import masked_bce
from ranker.models import MMoE, SharedBottom
from ranker.module import DenseAdam

INPUTS = InputSpec(
    cat_names=("user", "item", "hour"),
    cardinalities=(50, 80, 24),
    embedding_dims=(8, 8, 4),
    num_names=("age", "duration"),
)
TASKS = (
    TaskSpec("click", "click", "watch"),
    TaskSpec("long_view", "long_view", "watch"),
    TaskSpec("like", "like", "interaction", weight=2.0),
)
MODELS = {
    "shared_bottom": lambda: SharedBottom(INPUTS, TASKS, bottom_hidden=(32, 16)),
    "mmoe": lambda: MMoE(INPUTS, TASKS, num_experts=3, expert_hidden=(32, 16)),
}


def batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in INPUTS.cardinalities], dim=1)
    return cat, torch.randn(n, INPUTS.num_numeric, generator=g)


def test_fused_embedding_offsets_and_sparse_gradients() -> None:
    embedding = FusedEmbedding(INPUTS)
    assert len(embedding.tables) == 2  # one table per width
    assert embedding.tables[1].num_embeddings == 50 + 80  # the 8-wide features share one
    cat, num = batch(4)
    out = embedding(cat, num)
    assert out.shape == (4, 8 + 8 + 4 + 2)
    # tables in width order (hour first); "item" reads row offset(item) + index
    wide = embedding.tables[1].weight
    torch.testing.assert_close(out[:, :4], embedding.tables[0].weight[cat[:, 2]])
    torch.testing.assert_close(out[:, 12:20], wide[50 + cat[:, 1]])
    out.sum().backward()
    assert wide.grad.is_sparse
    touched = wide.grad.coalesce().indices().unique()
    assert len(touched) <= 8  # only the rows of the batch


@pytest.mark.parametrize("name", list(MODELS))
def test_signature_and_finite_outputs(name: str) -> None:
    model = MODELS[name]()
    cat, num = batch()
    logits = model(cat, num)["logits"]
    assert logits.shape == (64, len(TASKS)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    cat, num = batch(256, seed=1)
    # labels that depend on the inputs, so there is something to learn
    labels = torch.stack([(cat[:, 0] % 2 == 0), (cat[:, 1] % 3 == 0), (num[:, 0] > 1)], 1)
    labels = labels.float()
    weights = torch.tensor([t.weight for t in TASKS])
    sparse = list(model.embedding.parameters())
    dense = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    optimizers = [torch.optim.AdamW(dense, lr=1e-2), torch.optim.SparseAdam(sparse, lr=1e-2)]
    first = None
    for _ in range(30):
        loss, _ = masked_bce(model(cat, num)["logits"], labels, weights)
        first = first if first is not None else loss.item()
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    assert loss.item() < 0.7 * first


def test_masked_loss_ignores_null_labels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), float("nan")]])
    weights = torch.tensor([1.0, 3.0])
    total, per_task = masked_bce(logits, labels, weights)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected_0 = (bce(logits[0, 0], labels[0, 0]) + bce(logits[1, 0], labels[1, 0])) / 2
    expected_1 = bce(logits[1, 1], labels[1, 1])
    torch.testing.assert_close(per_task, torch.stack([expected_0, expected_1]))
    torch.testing.assert_close(total, expected_0 + 3 * expected_1)
    # a missing label gets no gradient, whatever its logit
    logits.requires_grad_(True)
    masked_bce(logits, labels, weights)[0].backward()
    assert logits.grad[0, 1] == 0 and logits.grad[2].abs().sum() == 0


def test_a_task_with_no_observed_label_contributes_zero() -> None:
    labels = torch.full((4, 2), float("nan"))
    labels[:, 0] = 1.0
    total, per_task = masked_bce(torch.zeros(4, 2), labels, torch.ones(2))
    assert per_task[1] == 0 and math.isclose(total.item(), math.log(2), rel_tol=1e-6)


def test_dense_adam_on_sparse_rows_is_adam_on_a_dense_table() -> None:
    """``embedding_optimizer: adam``: every row moves (momentum), exactly as torch's Adam on
    the same table with dense gradients."""
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Embedding(10, 3)
    dense.load_state_dict(sparse.state_dict())
    optimisers = [
        DenseAdam(sparse.parameters(), lr=0.1),
        torch.optim.Adam(dense.parameters(), lr=0.1),
    ]
    for step in range(3):
        ids = torch.tensor([step, step + 1])
        for table, optimiser in zip((sparse, dense), optimisers, strict=True):
            optimiser.zero_grad()
            table(ids).sum().backward()
            optimiser.step()
    torch.testing.assert_close(sparse.weight, dense.weight)
    assert not torch.equal(sparse.weight[0], dense.weight.new_zeros(3))


def test_folding_expert_norms_leaves_the_eval_outputs_unchanged() -> None:
    torch.manual_seed(0)
    pool = ExpertPool(3, 6, (5, 4), activation="swish", normalize=True, feature_gate_rank=2)
    for norm in pool.norms:  # trained statistics and affine terms, not the initial ones
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    pool.eval()
    x = torch.randn(9, 6)
    with torch.no_grad():
        before = pool(x)
        pool.fold_norms()
        after = pool(x)
    assert not any(isinstance(n, torch.nn.BatchNorm1d) for n in pool.norms)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_id_dropout_sends_the_named_features_known_ids_to_unknown_in_training_only() -> None:
    names = ("user_id", "item_id", "author_id")
    dropout = IdDropout(names, {"item_id": 0.3, "author_id": 0.0})
    cat = torch.randint(1, 50, (20_000, 3))
    torch.manual_seed(0)
    dropped = dropout.train()(cat)
    assert torch.equal(dropped[:, [0, 2]], cat[:, [0, 2]])  # other features untouched
    share = (dropped[:, 1] == 0).float().mean().item()
    assert abs(share - 0.3) < 0.02
    kept = dropped[:, 1] != 0
    assert torch.equal(dropped[kept, 1], cat[kept, 1])
    assert torch.equal(dropout.eval()(cat), cat)  # scoring sees every id
    with pytest.raises(ValueError, match=r"unknown features \['video'\]"):
        IdDropout(names, {"video": 0.1})
    with pytest.raises(ValueError, match=r"shares must be in \[0, 1\): \['item_id'\]"):
        IdDropout(names, {"item_id": 1.0})


def test_history_dropout_pads_a_share_of_behaviours_aligned_in_training_only() -> None:
    dropout = HistoryDropout(0.25)
    ids = torch.randint(1, 50, (4_000, 30))
    sequences = {"items": ids, "authors": ids + 100, "short": torch.randint(1, 9, (4_000, 5))}
    dropped = dropout.train()(sequences, seed=7)
    gone = dropped["items"] == 0
    assert abs(gone.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped["items"][~gone], ids[~gone])  # the rest untouched
    assert torch.equal(dropped["authors"] == 0, gone)  # aligned: the same positions
    assert abs((dropped["short"] == 0).float().mean().item() - 0.25) < 0.02
    again = dropout(sequences, seed=7)  # a resumed run drops what it dropped
    assert all(torch.equal(again[k], dropped[k]) for k in sequences)
    assert not torch.equal(dropout(sequences, seed=8)["items"], dropped["items"])
    assert dropout.eval()(sequences) is sequences  # scoring sees every behaviour
    assert HistoryDropout(0.0).train()(sequences) is sequences
    with pytest.raises(ValueError, match=r"history_dropout must be in \[0, 1\), got 1.0"):
        HistoryDropout(1.0)


def test_recent_history_dropout_takes_behaviours_from_the_recent_end() -> None:
    """``recent``: each row loses its most recent behaviours (right-aligned, most recent
    last), a share ``recent`` of them on average; aligned sequences lose the same ones."""
    rows, length = 4000, 20
    count = torch.randint(1, length + 1, (rows,))
    position = torch.arange(length)
    ids = torch.where(
        position >= length - count.unsqueeze(1), torch.randint(1, 50, (rows, length)), 0
    )
    dropout = HistoryDropout(0.0, recent=0.2).train()
    out = dropout({"items": ids, "authors": ids + 100 * (ids > 0)}, seed=3)
    kept, dropped = out["items"] > 0, (ids > 0) & (out["items"] == 0)
    assert torch.equal(kept, out["authors"] > 0)  # aligned: the same positions
    # Every dropped behaviour is more recent than every kept one of its row.
    last_kept = torch.where(kept, position, -1).max(1).values
    first_dropped = torch.where(dropped, position, length).min(1).values
    assert bool((first_dropped > last_kept).all())
    share = dropped.sum() / (ids > 0).sum()
    assert 0.17 < float(share) < 0.23
    again = dropout({"items": ids, "authors": ids + 100 * (ids > 0)}, seed=3)
    assert torch.equal(again["items"], out["items"])  # the seed alone decides
    assert torch.equal(dropout.eval()({"items": ids})["items"], ids)
