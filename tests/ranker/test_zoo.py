"""The zoo: every model and config, HoME's mechanisms and masks, by construction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from features.state import InputSpec
from ranker.experts import ExpertPool, FeatureGate
from ranker.loss import masked_bce
from ranker.models import PLE, AdaTT, HoME, MultiTaskModel, build
from tests.conftest import CONFIGS
from tests.ranker.common import (
    INPUTS,
    SEQ_INPUTS,
    SMALL,
    TASKS,
    batch,
    model_configs,
    network_config,
    sequences,
)

MODEL_CONFIGS = model_configs(CONFIGS / "model")


def from_config(path: Path, inputs: InputSpec = INPUTS, **overrides: object) -> MultiTaskModel:
    """The network a model config describes (what LightningCLI builds), on the test inputs."""
    network = network_config(path)
    return build(network, inputs, TASKS, **overrides)


def small(path: Path) -> MultiTaskModel:
    """A config's model, small, on inputs with sequences (every model reads them)."""
    torch.manual_seed(0)  # the same weights whatever ran before
    overrides = dict(SMALL)
    if "shared_bottom" in path.name:
        overrides = {"bottom_hidden": [16, 8], "tower_hidden": [8]}
    return from_config(path, SEQ_INPUTS, **overrides)


def rows(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(cat, num, sequences)`` for the models ``small`` builds."""
    return (*batch(n, seed), sequences(n, seed))


@pytest.mark.parametrize(
    "path", MODEL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS / "model").with_suffix("").as_posix()
)
def test_every_config_builds_with_the_signature(path: Path) -> None:
    model = from_config(path, SEQ_INPUTS)
    inputs = rows()
    logits = model(*inputs)["logits"]
    assert logits.shape == (32, len(TASKS)) and torch.isfinite(logits).all()
    again, internals = model.forward_with_internals(*inputs)
    torch.testing.assert_close(logits, again["logits"])
    for name, (experts, weights) in internals.gates.items():
        assert weights.shape == (32, len(experts)), name
        torch.testing.assert_close(weights.sum(1), torch.ones(32))


@pytest.mark.parametrize(
    "path", MODEL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS / "model").with_suffix("").as_posix()
)
def test_gradient_reaches_every_parameter(path: Path) -> None:
    model = small(path)
    inputs = rows()
    first_step = {}
    for step in range(2):
        model.zero_grad()
        model(*inputs)["logits"].sum().backward()
        for name, p in model.named_parameters():
            if step == 0:
                first_step[name] = p.grad is not None and bool(p.grad.to_dense().abs().sum() > 0)
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)  # a step away from the initialisation
    for name, p in model.named_parameters():
        reached = first_step[name] or bool(p.grad.to_dense().abs().sum() > 0)
        # The feature gate's B gets gradient once A has left zero (LoRA), i.e. from step 2.
        assert reached, f"no gradient reached {name}"


def test_every_expert_gate_and_feature_gate_gets_gradient_at_the_first_step() -> None:
    model = from_config(CONFIGS / "model" / "home.yaml", **SMALL)
    model(*batch())["logits"].sum().backward()
    for name, p in model.named_parameters():
        if "embedding" in name or name.endswith("feature_gate.down"):
            continue  # sparse rows / the gate's B, zero-gradient while A = 0 by design
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_feature_gate_is_the_identity_at_initialisation() -> None:
    gate = FeatureGate(12, rank=3, num_experts=4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(gate(x), x.unsqueeze(1).expand(5, 4, 12))
    model = from_config(CONFIGS / "model" / "home.yaml", **SMALL)
    pools = [pool for layer in model.layers for pool in layer.pools.values()]
    assert all(p.feature_gate is not None and p.feature_gate.up.shape[0] == len(p) for p in pools)
    with torch.no_grad():
        gate.up.normal_()
    views = gate(x)
    assert not torch.allclose(views[:, 0], views[:, 1])  # each expert its own view


@pytest.mark.parametrize("normalize", [False, True])
def test_a_pool_computes_each_expert_as_its_own_mlp(normalize: bool) -> None:
    torch.manual_seed(0)
    pool = ExpertPool(
        3, 10, hidden=(7, 5), activation="swish", normalize=normalize, feature_gate_rank=2
    )
    with torch.no_grad():
        pool.feature_gate.up.normal_()
    x = torch.randn(16, 10)
    out = pool(x)
    assert out.shape == (16, 3, 5)
    for k in range(3):  # expert k, written out on its own
        g = pool.feature_gate
        h = x * 2 * torch.sigmoid(x @ g.down[k] @ g.up[k])
        for layer in range(2):
            h = h @ pool.weights[layer][k] + pool.biases[layer][k]
            if normalize:
                width = h.shape[1]
                norm = pool.norms[layer]
                mean, var = h.mean(0), h.var(0, unbiased=False)
                h = (h - mean) / torch.sqrt(var + norm.eps)
                h = h * norm.weight[k * width : (k + 1) * width]
                h = h + norm.bias[k * width : (k + 1) * width]
            h = torch.nn.functional.silu(h)
        torch.testing.assert_close(out[:, k], h)


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def test_home_task_gates_never_see_another_groups_experts() -> None:
    model = from_config(CONFIGS / "model" / "home.yaml", **SMALL).eval()
    cat, num = batch()
    _, internals = model.forward_with_internals(cat, num)
    watch, interaction = ("click", "long_view"), ("like", "comment")
    for task in watch:
        experts = internals.gates[f"task/task:{task}"][0]
        assert not [e for e in experts if "interaction" in e or any(t in e for t in interaction)]
        assert {e.split("/")[1] for e in experts} == {f"task:{task}", "group:watch", "shared"}
    for group, other in (("watch", "interaction"), ("interaction", "watch")):
        experts = internals.gates[f"meta/group:{group}"][0]
        assert {e.split("/")[1] for e in experts} == {"shared", f"group:{group}"}
        assert not [e for e in experts if other in e]
    assert len(internals.gates["meta/shared"][0]) == 2 + 2 + 2  # the shared gate sees all
    # Changing the interaction group's task-layer experts leaves the watch tasks untouched.
    before = model(cat, num)["logits"]
    task_layer = model.layers[1]
    perturb(task_layer.pools["group:interaction"])
    perturb(task_layer.pools["task:like"])
    after = model(cat, num)["logits"]
    torch.testing.assert_close(after[:, :2], before[:, :2])
    assert not torch.allclose(after[:, 2], before[:, 2])


def test_home_with_every_switch_off_is_a_flat_cgc() -> None:
    sizes = {"shared_experts": 2, "task_experts": 1, **SMALL, "activation": "relu"}
    home = HoME(
        INPUTS,
        TASKS,
        group_experts=2,
        expert_norm=False,
        hierarchy=False,
        feature_gate_rank=0,
        self_gate=False,
        **sizes,
    )
    cgc = PLE(INPUTS, TASKS, levels=1, **sizes)
    home_params, cgc_params = home.state_dict(), cgc.state_dict()
    assert [v.shape for v in home_params.values()] == [v.shape for v in cgc_params.values()]
    home.load_state_dict(dict(zip(home_params, cgc_params.values(), strict=True)))
    cat, num = batch()
    torch.testing.assert_close(home(cat, num), cgc(cat, num))


def test_batchnorm_experts_behave_in_eval_mode() -> None:
    model = from_config(CONFIGS / "model" / "home.yaml", **SMALL)
    cat, num = batch(64)
    for _ in range(3):
        model(cat, num)  # training mode: running statistics move
    model.eval()
    whole = model(cat, num)["logits"]
    alone = torch.cat([model(cat[i : i + 1], num[i : i + 1])["logits"] for i in range(4)])
    torch.testing.assert_close(whole[:4], alone)  # a row's score does not depend on its batch
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(n.num_batches_tracked > 0 for n in norms)


def test_adatt_gates_fuse_every_tasks_experts_with_a_native_residual() -> None:
    model = AdaTT(INPUTS, TASKS, levels=2, task_experts=2, shared_experts=1, **SMALL)
    _, internals = model.forward_with_internals(*batch())
    experts = internals.gates["level0/task:click"][0]
    assert len(experts) == len(TASKS) * 2 + 1
    assert "level0/shared" in internals.gates and "level1/shared" not in internals.gates
    assert set(model.layers[0].residuals) == {*(f"task:{t.name}" for t in TASKS), "shared"}


@pytest.mark.parametrize(
    "path", MODEL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS / "model").with_suffix("").as_posix()
)
def test_a_few_steps_lower_the_loss(path: Path) -> None:
    torch.manual_seed(0)
    model = small(path)
    cat, num, seqs = rows(256, seed=1)
    labels = torch.stack(
        [cat[:, 0] % 2 == 0, cat[:, 1] % 3 == 0, num[:, 0] > 1, num[:, 1] > 0.5], 1
    ).float()
    sparse = list(model.embedding.parameters())
    dense = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    optimizers = [torch.optim.AdamW(dense, lr=1e-2), torch.optim.SparseAdam(sparse, lr=1e-2)]
    losses = []
    for _ in range(40):
        loss, _ = masked_bce(model(cat, num, seqs)["logits"], labels, torch.ones(len(TASKS)))
        losses.append(loss.item())
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
    assert losses[-1] < 0.7 * losses[0]


def test_each_ablation_overlay_turns_one_home_mechanism_off() -> None:
    """The overlays as LightningCLI composes them (checked through ``--print_config``)."""
    base = network_config(CONFIGS / "model" / "home.yaml")["init_args"]
    expected = {
        "no_norm": {"activation": "relu", "expert_norm": False},
        "flat": {"hierarchy": False},
        "no_feature_gate": {"feature_gate_rank": 0},
        "no_self_gate": {"self_gate": False},
    }
    overlays = sorted((CONFIGS / "model" / "home").glob("*.yaml"))
    assert [p.stem for p in overlays] == sorted(expected)
    for path in overlays:
        composed = network_config(path)["init_args"]
        assert {k: v for k, v in composed.items() if base.get(k) != v} == expected[path.stem]
    ranker = Path(sys.executable).parent / "ranker"
    flat = CONFIGS / "model" / "home" / "flat.yaml"
    printed = subprocess.run(
        [str(ranker), "fit", "--config", str(CONFIGS / "trainer.yaml"), "--config",
         str(CONFIGS / "model" / "home.yaml"), "--config", str(flat), "--print_config"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    network = yaml.safe_load(printed)["model"]["network"]
    assert network["class_path"] == "ranker.models.HoME"
    assert network["init_args"]["hierarchy"] is False and network["init_args"]["self_gate"]
