"""Learned task weights: uncertainty weighting moves weight away from a noisy task."""

from __future__ import annotations

import torch

from features.config import TaskSpec
from ranker.loss import FixedWeights, UncertaintyWeights, masked_bce
from ranker.models import MMoE
from ranker.module import RankerModule
from tests.ranker.common import INPUTS, batch

TASKS = (TaskSpec("clean", "clean", "g"), TaskSpec("noisy", "noisy", "g", weight=2.0))


def test_uncertainty_weights_move_toward_the_clean_task() -> None:
    """Planted: one label is a function of the item id, the other a fair coin. The noisy
    task keeps a high loss, learns a large sigma and ends with the smaller weight."""
    torch.manual_seed(0)
    module = RankerModule(
        lambda i, t: MMoE(i, t, num_experts=2, expert_hidden=[16], tower_hidden=[8]),
        inputs=INPUTS,
        tasks=TASKS,
        loss_weighting="uncertainty",
        learning_rate=0.01,
    )
    assert isinstance(module.weighting, UncertaintyWeights)
    torch.testing.assert_close(module.weighting.current(), torch.tensor([1.0, 2.0]))
    optimisers = module.configure_optimizers()
    assert any(module.weighting.log_variance is p for p in optimisers[0].param_groups[1]["params"])
    g = torch.Generator().manual_seed(1)
    for step in range(300):
        cat, num = batch(256, seed=step)
        clean = (cat[:, 1] % 2).float()
        noisy = torch.randint(0, 2, (256,), generator=g).float()
        labels = torch.stack([clean, noisy], 1)
        _, per_task = masked_bce(module(cat, num), labels, module.task_weights)
        loss = module.weighting(per_task)
        for o in optimisers:
            o.zero_grad()
        loss.backward()
        for o in optimisers:
            o.step()
    clean_weight, noisy_weight = (module.weighting.current() / module.task_weights).tolist()
    assert clean_weight > 1.5 and noisy_weight < 1.0, (clean_weight, noisy_weight)


def test_fixed_weights_are_the_datasets_and_learn_nothing() -> None:
    weights = FixedWeights(torch.tensor([1.0, 3.0]))
    assert list(weights.parameters()) == [] and weights.state_dict() == {}
    assert weights(torch.tensor([0.5, 0.25])).item() == 1.25


def test_a_task_absent_from_the_batch_adds_nothing() -> None:
    weighting = UncertaintyWeights(torch.ones(2))
    with torch.no_grad():
        weighting.log_variance.fill_(0.5)
    absent = weighting(torch.tensor([0.4, 0.0]), torch.tensor([True, False]))
    only_first = UncertaintyWeights(torch.ones(1))
    with torch.no_grad():
        only_first.log_variance.fill_(0.5)
    torch.testing.assert_close(absent, only_first(torch.tensor([0.4])))
