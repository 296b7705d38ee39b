"""Fewer, larger kernels and the compiled step: the same numbers as the modules one by one.

Pools of one shape on one input run as one pool (``pools_together``), a layer's gates on one
input as one matmul, the towers as one batched matmul per layer (``towers_together``); and
``compile_dense`` compiles what follows the lookup. Each is checked against the plain
per-module computation with the same weights: logits, gradients and the state dict."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.train_step import one_by_one
from ranker.models import build
from tests.conftest import CONFIGS
from tests.ranker.common import INPUTS, TASKS, batch, network_config

FUSED = [
    "home.yaml",
    "ple.yaml",
    "cgc.yaml",
    "adatt.yaml",
    "mmoe.yaml",
    "home/no_feature_gate.yaml",
    "mmoe_topk.yaml",
]


def logits_and_grads(model: torch.nn.Module, cat, num) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(cat, num)["logits"]
    (logits * torch.linspace(-1, 1, logits.shape[1])).sum().backward()
    grads = {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("name", FUSED)
def test_fused_pools_gates_and_towers_equal_the_modules_one_by_one(name: str) -> None:
    torch.manual_seed(0)
    network = network_config(CONFIGS / "model" / name)
    model = build(network, INPUTS, TASKS, expert_hidden=[16, 8], tower_hidden=[8]).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    cat, num = batch(64)
    fused = logits_and_grads(model, cat, num)
    with one_by_one():  # every pool, gate and tower on its own (the code before the fusion)
        plain = logits_and_grads(reference, cat, num)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    assert fused[1].keys() == plain[1].keys()
    for key in plain[1]:
        torch.testing.assert_close(fused[1][key], plain[1][key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.state_dict(), reference.state_dict())  # BatchNorm stats too
    groups = [g for layer in model.layers for g in layer.pool_groups]
    assert (len(groups) < sum(len(layer.pools) for layer in model.layers)) == (
        name in ("ple.yaml", "cgc.yaml", "adatt.yaml", "home/no_feature_gate.yaml")
    )  # pools ran together, where they have no feature gates


def test_the_compiled_dense_part_trains_as_the_eager_one() -> None:
    torch.manual_seed(0)
    network = network_config(CONFIGS / "model" / "mmoe.yaml")
    eager = build(network, INPUTS, TASKS[:2], num_experts=2, expert_hidden=[8], tower_hidden=[4])
    compiled = copy.deepcopy(eager)
    keys = compiled.state_dict().keys()
    compiled.compile_dense()
    assert compiled.state_dict().keys() == keys  # checkpoints load into either
    cat, num = batch(32)
    for _ in range(2):  # the second step reuses the compiled code
        expected, got = logits_and_grads(eager, cat, num), logits_and_grads(compiled, cat, num)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        for key in expected[1]:
            torch.testing.assert_close(got[1][key], expected[1][key], rtol=1e-4, atol=1e-6)
    kept = compiled.__dict__["towers_on"]
    compiled.use_compiled(False)  # validation's passes: the eager method, the code kept
    assert "towers_on" not in compiled.__dict__
    compiled.use_compiled(True)
    assert compiled.__dict__["towers_on"] is kept  # nothing compiled again
    compiled.eager()
    compiled.use_compiled(True)  # after the fit: nothing left to switch to
    copy.deepcopy(compiled).load_state_dict(eager.state_dict())
    assert "towers_on" not in compiled.__dict__
