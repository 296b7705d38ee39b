"""MTMT, the multi-head baseline and the S-learner: every arm scored, the observed arm's logits
for the loss; on generated data with a planted tiered effect, MTMT recovers it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch

from features.config import TaskSpec
from features.contract import ARM_LOGITS, LOGITS
from features.datamodule import RankerDataModule
from features.state import InputSpec
from features.synth_uplift import generate_uplift, true_logits
from ranker.models import MTMT, ArmHeads, MMoE, build
from ranker.module import RankerModule
from ranker.scoring import score
from tests.conftest import CONFIGS
from tests.features.test_treatment import write
from tests.ranker.common import model_configs, network_config

INPUTS = InputSpec(("a", "b"), (5, 6), (4, 4), ("n",), arms=("control", "t1", "t2"))
TASKS = [TaskSpec("visit", "visit", "g"), TaskSpec("buy", "buy", "h")]


@pytest.mark.parametrize("model", [MTMT, ArmHeads, MMoE])
def test_every_arm_is_scored_and_logits_are_the_observed_arms(model: type) -> None:
    torch.manual_seed(0)
    network = model(INPUTS, TASKS).eval()
    cat, num = torch.randint(0, 5, (32, 2)), torch.randn(32, 1)
    treatment = torch.randint(0, 3, (32,))
    with torch.no_grad():
        out = network(cat, num, None, treatment)
        assert out[ARM_LOGITS].shape == (32, 3, 2)
        picked = out[ARM_LOGITS][torch.arange(32), treatment]
        torch.testing.assert_close(out[LOGITS], picked)
        natural = network(cat, num)  # no arm given: control's
        torch.testing.assert_close(natural[LOGITS], out[ARM_LOGITS][:, 0])
    network.train()
    trained = network(cat, num, None, treatment)
    assert trained[LOGITS].shape == (32, 2)


@pytest.mark.parametrize(
    "switch",
    [
        {"interaction": "mlp"},
        {"tiered": False},
        {"shared_tau": True},
        {"detach_natural": False},
        {"normalize_tokens": False},
    ],
    ids=lambda switch: "-".join(f"{k}={v}" for k, v in switch.items()),
)
def test_every_mtmt_ablation_scores_every_arm_and_reads_the_user(switch: dict) -> None:
    torch.manual_seed(0)
    network = MTMT(INPUTS, TASKS, **switch)
    for p in network.parameters():  # past the zero-initialised effect heads
        torch.nn.init.normal_(p, std=0.3)
    cat, num = torch.randint(0, 5, (32, 2)), torch.randn(32, 1)
    out = network(cat, num, None, torch.arange(32) % 3)
    effect = out["arm_effect"]
    assert out[ARM_LOGITS].shape == (32, 3, 2) and effect.shape == (32, 2, 2)
    assert effect.std(0).min() > 0  # heterogeneous: the effect depends on the user
    out[LOGITS].sum().backward()
    grads = [p.grad.to_dense() for p in network.parameters() if p.grad is not None]  # sparse too
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mtmt_effects_add_up_to_every_arms_response() -> None:
    network = MTMT(INPUTS, TASKS).eval()
    cat, num = torch.randint(0, 5, (16, 2)), torch.randn(16, 1)
    with torch.no_grad():
        out = network(cat, num)
    arm = out[ARM_LOGITS]
    expected = arm[:, :1] + out["base_effect"][:, None] + out["arm_effect"]
    torch.testing.assert_close(arm[:, 1:], expected)


@pytest.mark.parametrize(
    "path", model_configs(CONFIGS / "model", uplift=True), ids=lambda p: p.stem
)
def test_every_uplift_config_builds_and_every_parameter_learns(path: Path) -> None:
    torch.manual_seed(0)
    network = build(network_config(path), INPUTS, TASKS, expert_hidden=[32, 16])
    cat, num = torch.randint(0, 5, (64, 2)), torch.randn(64, 1)
    treatment = torch.arange(64) % 3
    reached = set()
    for _ in range(2):  # the zero-initialised effect heads pass gradient on from step 2
        network.zero_grad()
        out = network(cat, num, None, treatment)
        (out[LOGITS].sum() + out[ARM_LOGITS].sum()).backward()
        for name, p in network.named_parameters():
            if p.grad is not None and p.grad.to_dense().abs().sum() > 0:
                reached.add(name)
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
    assert reached == {name for name, _ in network.named_parameters()}


def test_uplift_models_need_a_treatment() -> None:
    plain = InputSpec(("a",), (5,), (4,), ())
    with pytest.raises(
        ValueError, match="MTMT is an uplift model: the dataset config needs a treatment"
    ):
        MTMT(plain, TASKS)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_mtmt_recovers_a_planted_tiered_effect(tmp_path: Path) -> None:
    """The true effects are known per customer (``features.synth_uplift``): MTMT's predicted
    base effect follows the true base effect of any treatment, and each arm's total effect
    follows that arm's."""
    customers = generate_uplift(rows=24_000, treatments=3, seed=0)
    data = RankerDataModule(str(write(tmp_path, customers)), batch_size=256, seed=0)
    data.setup("fit")
    L.seed_everything(0)
    module = RankerModule(
        lambda inputs, tasks: MTMT(inputs, tasks), data.input_spec, data.tasks, calibration="none"
    )
    L.Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    ).fit(module, datamodule=data)  # fmt: skip
    scored = score(module.network, data.test_dataloader())
    test = customers.filter(pl.col("split") == "test").sort("customer")
    order = np.argsort(scored.users)  # the customer id is the user key
    x = test.select([f"x{j}" for j in range(4)]).to_numpy()
    truth = true_logits(x, test["region"].to_numpy(), test["tier"].to_numpy(), 3, seed=0)
    outputs = {k: v[order] for k, v in scored.outputs.items()}
    true_base, true_arm = truth["visit"][1], truth["visit"][2]
    assert corr(outputs["base_effect"][:, 0], true_base) > 0.5
    for m in range(2):
        total = outputs["base_effect"][:, 0] + outputs["arm_effect"][:, m, 0]
        assert corr(total, true_base + true_arm[:, m]) > 0.5, m
