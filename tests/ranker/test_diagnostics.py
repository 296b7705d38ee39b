"""Expert health: collapse, degradation and underfitting found where they are planted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from features.datamodule import TensorBatch
from ranker.diagnostics import ExpertStats, HealthLimits, health
from ranker.experts import Internals
from ranker.models import PLE, AdaTT, HoME, MMoE, MultiTaskModel, SharedBottom, build
from tests.ranker.common import INPUTS, SMALL, TASKS, batch, expert_stats

NAMES = [t.name for t in TASKS]
RATES = {"click": 0.3, "long_view": 0.2, "like": 0.02, "comment": 0.008}


def batches(count: int = 2, n: int = 48, seed: int = 0) -> list[TensorBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        cat, num = batch(n, seed=seed * 1000 + i)
        labels = torch.rand(n, len(TASKS), generator=g)
        out.append(TensorBatch(cat, num, labels, torch.arange(n)))
    return out


def mmoe(activation: str = "relu") -> MMoE:
    torch.manual_seed(0)
    network = {"class_path": "ranker.models.MMoE", "init_args": {"num_experts": 4}}
    model = build(network, INPUTS, TASKS, activation=activation, **SMALL)
    assert isinstance(model, MMoE)
    return model


def cgc() -> PLE:
    torch.manual_seed(0)
    return PLE(INPUTS, TASKS, levels=1, shared_experts=4, task_experts=1, **SMALL)


def report_of(model: MultiTaskModel, **kwargs: object):
    return health(expert_stats(model, batches()), NAMES, positive_rates=RATES, **kwargs)


def test_a_healthy_mmoe_has_no_collapse() -> None:
    report = report_of(mmoe())
    assert report.collapsed == [] and not any(f.startswith("collapse") for f in report.flags)
    assert len(report.experts) == 4 and all(0 < r.zero_share < 0.9 for r in report.experts)
    assert report.degraded == [] and report.flags == []


def test_a_healthy_home_has_no_collapse_and_no_zeros() -> None:
    torch.manual_seed(0)
    home = HoME(INPUTS, TASKS, **SMALL)  # swish + expert normalisation (BatchNorm)
    report = report_of(home)
    assert report.collapsed == [], report.flags
    assert all(r.zero_share < 0.01 for r in report.experts)  # swish is ~never exactly 0
    assert {r.layer for r in report.experts} == {"meta", "task"}
    assert report.degraded == [] and report.underfitting == [] and report.flags == []


def test_a_dead_expert_is_collapsed_and_only_it() -> None:
    model = mmoe("relu")
    pool = model.layers[0].pools["shared"]
    with torch.no_grad():
        pool.biases[-1][2].fill_(-1e4)  # every pre-activation of expert 2 negative
    report = report_of(model)
    rows = {r.name: r for r in report.experts}
    dead = rows["mmoe/shared/2"]
    assert dead.zero_share == 1.0 and dead.std == 0.0 and dead.mean == 0.0
    assert dead.collapsed and "100.0% zero activations" in dead.reason
    assert report.collapsed == ["mmoe/shared/2"]
    assert any(f.startswith("collapse: mmoe/shared/2 has 100.0% zero") for f in report.flags)


def test_an_expert_on_another_scale_is_collapsed() -> None:
    model = mmoe("relu")
    pool = model.layers[0].pools["shared"]
    with torch.no_grad():
        pool.weights[-1][1].mul_(1000)
        pool.biases[-1][1].mul_(1000)
    report = report_of(model)
    assert report.collapsed == ["mmoe/shared/1"]
    row = next(r for r in report.experts if r.name == "mmoe/shared/1")
    assert "larger than its layer's median" in row.reason
    # A looser limit lets it pass.
    assert report_of(model, limits=HealthLimits(scale_ratio=1e4)).collapsed == []


@pytest.mark.parametrize("make", [mmoe, cgc], ids=["mmoe", "cgc"])
def test_a_shared_expert_taken_by_one_task_is_degraded(make) -> None:
    model = make()
    assert report_of(model).degraded == []  # unmodified: every shared expert is shared
    layer = model.layers[-1]
    with torch.no_grad():
        for task in NAMES:
            gate = layer.gates[f"task:{task}"]
            # Column of shared expert 0 in this task's gate (own experts come first in CGC).
            spec = next(g for g in layer.gate_specs if g.name == f"task:{task}")
            names = [f"{p}/{i}" for p in spec.pools for i in range(len(layer.pools[p]))]
            gate.bias[names.index("shared/0")] = 30.0 if task == "click" else -30.0
    report = report_of(model)
    layer_name = layer.name
    assert report.degraded == [f"{layer_name}/shared/0"]
    row = next(r for r in report.shared_experts if r.name == f"{layer_name}/shared/0")
    assert row.top_task == "click" and row.share > 0.99 and row.tasks_seen == 4
    assert any(
        f.startswith(f"degradation: shared expert {layer_name}/shared/0 is") and "'click'" in f
        for f in report.flags
    )
    others = [r for r in report.shared_experts if r.name != f"{layer_name}/shared/0"]
    assert others and all(r.share < 0.8 for r in others)


def test_a_sparse_task_ignoring_its_own_experts_is_underfitting() -> None:
    model = cgc()
    report = report_of(model)
    assert report.underfitting == []
    comment = next(r for r in report.tasks if r.name == "comment")
    assert comment.own_experts == 1 and comment.seen_experts == 5
    assert comment.uniform_mass == pytest.approx(0.2) and comment.own_mass > 0.1
    assert comment.positive_rate == 0.008 and comment.gate == "level0/task:comment"

    with torch.no_grad():
        model.layers[0].gates["task:comment"].bias[0] = -30.0  # own expert first in CGC
    report = report_of(model)
    assert report.underfitting == ["comment"]
    comment = next(r for r in report.tasks if r.name == "comment")
    assert comment.own_mass < 0.01 and comment.underfitting
    flag = next(f for f in report.flags if f.startswith("underfitting"))
    assert "'comment'" in flag and "positive rate 0.008" in flag and "even share 20.0%" in flag

    # MMoE has no task-specific experts: own mass NaN, never underfitting.
    rows = report_of(mmoe()).tasks
    assert all(np.isnan(r.own_mass) and not r.underfitting for r in rows)


def test_stats_over_batches_equal_stats_over_the_concatenation() -> None:
    model = mmoe()
    model.eval()
    stats = ExpertStats()
    outputs, gates = [], []
    with torch.no_grad():
        for cat, num in (b.inputs[:2] for b in batches(2, n=48)):
            _, internals = model.forward_with_internals(cat, num)
            stats.update(internals)
            outputs.append(internals.experts["mmoe/shared"])
            gates.append(internals.gates["mmoe/task:like"][1])
    x = torch.cat(outputs).double().transpose(0, 1).flatten(1)  # [n, B * D]
    np.testing.assert_allclose(stats.mean("mmoe/shared"), x.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        stats.std("mmoe/shared"), x.std(1, unbiased=False).numpy(), rtol=1e-10
    )
    np.testing.assert_array_equal(stats.zero_share("mmoe/shared"), (x == 0).double().mean(1))
    np.testing.assert_allclose(stats.sum_sq["mmoe/shared"], x.square().sum(1).numpy())
    assert stats.count["mmoe/shared"].tolist() == [96 * 8] * 4
    w = torch.cat(gates).double().mean(0).numpy()
    np.testing.assert_allclose(stats.gate_mean("mmoe/task:like"), w, rtol=1e-12)
    assert stats.gate_rows["mmoe/task:like"] == 96

    # Large offset, tiny spread, uneven batches: the merge stays exact (no cancellation).
    g = torch.Generator().manual_seed(1)
    parts = [1e6 + torch.randn(b, 3, 5, generator=g, dtype=torch.float64) for b in (1, 7, 30)]
    stats = ExpertStats()
    for p in parts:
        stats.update(Internals(experts={"l/shared": p}))
    x = torch.cat(parts).transpose(0, 1).flatten(1)
    np.testing.assert_allclose(stats.std("l/shared"), x.std(1, unbiased=False), rtol=1e-9)


GATED = {
    "cgc": lambda: PLE(INPUTS, TASKS, levels=1, **SMALL),
    "ple": lambda: PLE(INPUTS, TASKS, levels=2, **SMALL),
    "adatt": lambda: AdaTT(INPUTS, TASKS, levels=2, shared_experts=1, **SMALL),
    "home": lambda: HoME(INPUTS, TASKS, **SMALL),
    "home_flat": lambda: HoME(INPUTS, TASKS, hierarchy=False, **SMALL),
}


@pytest.mark.parametrize("kind", list(GATED))
def test_gate_matrix_rows_sum_to_one_and_use_the_last_level(kind: str) -> None:
    torch.manual_seed(0)
    model = GATED[kind]()
    report = report_of(model)
    gm = report.gate_matrix
    assert gm["tasks"] == NAMES
    assert gm["weights"].shape == (4, len(gm["experts"]))
    np.testing.assert_allclose(gm["weights"].sum(1), 1.0, rtol=1e-6)
    assert np.all(gm["weights"][~gm["seen"]] == 0)
    last = "level1" if kind in ("ple", "adatt") else "level0" if kind == "cgc" else "task"
    assert {e.split("/")[0] for e in gm["experts"]} == {last}  # the layer feeding the towers
    assert [r.gate for r in report.tasks] == [f"{last}/task:{t}" for t in NAMES]
    json.dumps(report.to_dict(), allow_nan=False)


def test_shared_bottom_has_experts_and_an_empty_gate_matrix() -> None:
    torch.manual_seed(0)
    model = SharedBottom(INPUTS, TASKS, bottom_hidden=[16, 8], tower_hidden=[8])
    report = report_of(model)
    assert [r.name for r in report.experts] == ["bottom/shared/0"]
    assert report.gate_matrix["tasks"] == [] and report.gate_matrix["experts"] == []
    assert report.gate_matrix["weights"].shape == (0, 0)
    assert report.shared_experts == [] and report.underfitting == []
    assert [r.name for r in report.tasks] == NAMES
    assert all(r.gate is None and np.isnan(r.own_mass) for r in report.tasks)
    data = report.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["tasks"][0]["own_mass"] is None and data["tasks"][0]["positive_rate"] == 0.3


def test_scoring_restores_training_mode_and_stops_at_max_batches() -> None:
    model = mmoe()
    model.train()
    model.towers[0].eval()  # a mixed state comes back as it was
    stats = expert_stats(model, batches(4, n=16), max_batches=2)
    assert stats.batches == 2 and stats.gate_rows["mmoe/task:click"] == 32
    assert model.training and not model.towers[0].training and model.towers[1].training
    model.eval()
    expert_stats(model, batches(1, n=16))
    assert not any(m.training for m in model.modules())


def test_a_dead_expert_and_a_pinned_gate_are_collapsed_and_a_healthy_model_is_not() -> None:
    assert report_of(mmoe()).collapsed == []
    model = mmoe("relu")
    with torch.no_grad():
        model.layers[0].pools["shared"].biases[-1][3].fill_(-1e4)  # every pre-activation < 0
        gate = model.layers[0].gates["task:click"]
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([0.0, 8.0, 0.0, 0.0]))  # click takes ~99.8% from expert 1
    report = report_of(model)
    assert report.collapsed == ["mmoe/shared/3", "mmoe/task:click"]
    pinned = next(g for g in report.gates if g.pinned)
    assert pinned.top_expert == "mmoe/shared/1" and pinned.top_weight > 0.99
    assert any(f.startswith("collapse: gate mmoe/task:click puts 99.") for f in report.flags)
    assert "gates" in report.to_dict()


def test_the_output_sample_is_uniform_rows_and_independent_of_batching() -> None:
    model = mmoe()
    data = batches(4, n=40)
    by_batch = expert_stats(model, data, sample_rows=50)
    whole = expert_stats(
        model,
        [
            TensorBatch(
                *(
                    torch.cat([getattr(b, k) for b in data])
                    for k in ("cat", "num", "labels", "users")
                )
            )
        ],
        sample_rows=50,
    )
    sample = by_batch.samples["mmoe/shared"]
    assert sample.shape == (50, 4, 8)
    np.testing.assert_array_equal(sample, whole.samples["mmoe/shared"])
    # every sampled row is one of the real output rows, and no row twice
    model.eval()
    with torch.no_grad():
        outputs = torch.cat(
            [model.forward_with_internals(b.cat, b.num)[1].experts["mmoe/shared"] for b in data]
        ).numpy()
    matches = (sample[:, None] == outputs[None]).all(axis=(2, 3))
    assert (matches.sum(axis=1) == 1).all() and len(set(matches.argmax(axis=1))) == 50
    assert expert_stats(model, data).samples == {}  # off by default
