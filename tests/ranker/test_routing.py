"""DeepSeekMoE routing (ranker.experts.Routing) and AW-MoE's attention gates and contrast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from features.datamodule import TensorBatch
from ranker.diagnostics import health
from ranker.experts import Routing
from ranker.models import AWMoE, MMoE
from tests.ranker.common import INPUTS, ITEM, SEQ_INPUTS, TASKS, batch, expert_stats, sequences


def test_top_k_keeps_exactly_k_weights_per_row_summing_to_one() -> None:
    logits = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 5):
        weights, balance = Routing(top_k=k).route(logits)
        assert ((weights > 0).sum(1) == k).all()
        torch.testing.assert_close(weights.sum(1), torch.ones(500))
        kept = weights > 0  # the k largest logits of each row
        assert (
            logits[kept].view(500, k).min(1).values >= logits[~kept].view(500, -1).max(1).values
        ).all()
        assert balance is not None
    dense, none = Routing().route(logits)
    torch.testing.assert_close(dense, torch.softmax(logits, -1))
    assert none is None and Routing().margin(logits) is None


def test_the_margin_is_the_gap_between_the_kth_and_next_logit_and_is_recorded() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(Routing(top_k=1).margin(logits), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(Routing(top_k=2).margin(logits), torch.tensor([1.5, 0.0]))
    model = MMoE(INPUTS, TASKS, expert_hidden=[16, 8], routing=Routing(top_k=2))
    _, internals = model.forward_with_internals(*batch(32))
    assert set(internals.margins) == set(internals.gates)
    assert all(m.shape == (32,) and (m >= 0).all() for m in internals.margins.values())


def test_balance_term_on_a_hand_computed_case() -> None:
    """Two rows, four experts, k = 1. Row 1's softmax is [.5, .25, .125, .125] (top: expert 0),
    row 2's [.125, .125, .25, .5] (top: expert 3). f = 4 / (1 * 2) * [1, 0, 0, 1] = [2, 0, 0, 2];
    P = [.3125, .1875, .1875, .3125]; sum_i f_i P_i = 1.25."""
    logits = torch.log(torch.tensor([[4.0, 2, 1, 1], [1, 1, 2, 4]]))
    weights, balance = Routing(top_k=1).route(logits)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]]))
    assert balance.item() == pytest.approx(1.25)


def topk_mmoe(**routing: float) -> MMoE:
    torch.manual_seed(0)
    return MMoE(
        INPUTS,
        TASKS,
        num_experts=4,
        expert_hidden=[16, 8],
        tower_hidden=[8],
        activation="swish",  # no dead units: a routed expert always has a gradient
        always_on_experts=1,
        routing=Routing(**{"top_k": 2, "granularity": 2, **routing}),
    )


def test_a_gradient_reaches_exactly_the_experts_that_received_rows() -> None:
    model = topk_mmoe(top_k=1, granularity=4)  # 16 routed experts
    cat, num = batch(2)  # 2 rows x 4 gates x top-1: at most 8 of the 16 get rows
    outputs, internals = model.forward_with_internals(cat, num)
    outputs["logits"].sum().backward()
    routed = torch.zeros(16, dtype=torch.bool)
    for _, weights in internals.gates.values():
        routed |= (weights > 0).any(0)
    assert 0 < routed.sum() <= 8
    grads = model.layers[0].pools["shared"].weights[-1].grad  # [experts, in, out]
    reached = grads.flatten(1).abs().sum(1) > 0
    torch.testing.assert_close(reached, routed)
    always = model.layers[0].pools["always"].weights[-1].grad
    assert always.abs().sum() > 0  # the always-on expert serves every row


def test_fine_grained_experts_split_the_inner_layers_at_the_same_size() -> None:
    coarse = MMoE(INPUTS, TASKS, num_experts=4, expert_hidden=[16, 8])
    fine = MMoE(INPUTS, TASKS, num_experts=4, expert_hidden=[16, 8], routing=Routing(granularity=4))
    assert len(fine.layers[0].pools["shared"]) == 16
    sizes = [[w.numel() for w in m.layers[0].pools["shared"].weights] for m in (coarse, fine)]
    assert sizes[0] == sizes[1]  # m times as many experts, inner layers 1/m as wide
    assert fine.layers[0].output_dim == coarse.layers[0].output_dim == 8
    with pytest.raises(ValueError, match="expert_hidden needs two or more layers"):
        MMoE(INPUTS, TASKS, expert_hidden=[16], routing=Routing(granularity=2))


def test_the_balance_loss_trains_and_the_report_shows_load_and_idle_experts() -> None:
    model = topk_mmoe(balance=0.01)
    cat, num = batch(64)
    _, auxiliary = model.training_forward(cat, num)
    _, internals = model.forward_with_internals(cat, num)
    expected = 0.01 * torch.stack(list(internals.balance.values())).mean()
    torch.testing.assert_close(auxiliary["balance"], expected)
    auxiliary["balance"].backward()
    assert model.layers[0].gates["task:click"].weight.grad.abs().sum() > 0
    # A gate that never routes to expert 0: the report flags it idle.
    with torch.no_grad():
        for gate in model.layers[0].gates.values():
            gate.bias[0] = -1e4
    labels = torch.zeros(len(cat), len(TASKS))
    stats = expert_stats(model, [TensorBatch(cat, num, labels, torch.arange(len(cat)))])
    report = health(stats, [t.name for t in TASKS])
    assert "routing: expert mmoe/shared/0 receives no rows (no top-k gate routes to it)" in (
        report.flags
    )
    (row,) = [g for g in report.gates if g.name == "mmoe/task:click"]
    assert row.load[0] == 0 and sum(row.load) == pytest.approx(2.0) and row.idle >= 1
    assert math.isfinite(row.balance)


def aw_moe(**options: float) -> AWMoE:
    torch.manual_seed(0)
    return AWMoE(SEQ_INPUTS, TASKS, expert_hidden=[16, 8], tower_hidden=[8], **options)


def test_with_mask_rate_zero_both_views_are_one_and_the_loss_is_its_floor() -> None:
    """Nothing masked: the masked view's gate equals the row's own, every positive pair has
    cosine 1, and L_cl = mean_b logsumexp_c(<z_b, z_c> / tau) - 1 / tau."""
    model = aw_moe(mask_rate=0.0, temperature=0.5)
    with torch.no_grad():  # gates away from uniform, so rows' gate outputs differ
        for gate in model.layers[0].gates.values():
            gate.weight.mul_(30)
    cat, _ = batch(48)
    seqs = sequences(48)
    keep = torch.ones_like(seqs["clicked"], dtype=torch.bool)
    for k, v in model.gate_inputs(cat, seqs, keep).items():
        torch.testing.assert_close(v, model.gate_inputs(cat, seqs)[k])
    probabilities = model.gate_probabilities(model.gate_inputs(cat, seqs))
    expected = []
    for p in probabilities.values():
        z = F.normalize(p, dim=1)
        expected.append((torch.logsumexp(z @ z.T / 0.5, dim=1) - 1 / 0.5).mean())
    torch.testing.assert_close(model.contrastive_loss(cat, seqs), torch.stack(expected).mean())
    # Masking changes the views, hence the loss (the positives are no longer identical).
    model.mask_rate = 0.6
    assert not torch.isclose(model.contrastive_loss(cat, seqs), torch.stack(expected).mean())


def test_the_attention_gate_ignores_padding() -> None:
    model = aw_moe()
    cat, _ = batch(32)
    cat[:, ITEM] = cat[:, ITEM].clamp(min=1)  # candidates known: row 0 is only padding here
    seqs = sequences(32)
    before = model.gate_probabilities(model.gate_inputs(cat, seqs))
    with torch.no_grad():  # the padding id's embedding row, moved far
        table, start = model.embedding.rows_of[ITEM]
        model.embedding.tables[table].weight[start].add_(100.0)
    after = model.gate_probabilities(model.gate_inputs(cat, seqs))
    for k in before:
        torch.testing.assert_close(before[k], after[k])


def test_aw_moe_trains_its_gates_from_the_history_and_needs_one() -> None:
    model = aw_moe(contrastive_weight=0.1)
    cat, num = batch(64)
    seqs = sequences(64)
    outputs, auxiliary = model.training_forward(cat, num, seqs)
    logits = outputs["logits"]
    assert set(auxiliary) == {"contrastive"} and logits.shape == (64, len(TASKS))
    (logits.sum() + auxiliary["contrastive"]).backward()
    for k, unit in model.attention.items():
        assert unit.mlp[0].weight.grad.abs().sum() > 0, k
    with pytest.raises(ValueError, match="no feature of kind: sequence"):
        AWMoE(INPUTS, TASKS)
    with pytest.raises(ValueError, match="gate_sequence 'nope'"):
        AWMoE(SEQ_INPUTS, TASKS, gate_sequence="nope")


def test_always_on_experts_are_not_split_and_bad_routing_is_refused() -> None:
    model = MMoE(
        INPUTS,
        TASKS,
        expert_hidden=[16, 8],
        always_on_experts=1,
        routing=Routing(granularity=2, top_k=2),
    )
    assert len(model.layers[0].pools["always"]) == 1 and len(model.layers[0].pools["shared"]) == 16
    with pytest.raises(ValueError, match="set top_k"):
        Routing(balance=0.01)
    with pytest.raises(ValueError, match="granularity >= 1"):
        Routing(granularity=0)
