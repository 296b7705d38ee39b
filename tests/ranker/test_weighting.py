"""Learned task weights: uncertainty weighting moves weight away from a noisy task."""

from __future__ import annotations

import torch

from features.config import TaskSpec
from ranker.loss import FixedWeights, PCGrad, UncertaintyWeights, masked_bce, project_conflicts
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
    assert optimisers[0].defaults["fused"]  # one kernel for all dense parameters (CPU and GPU)
    g = torch.Generator().manual_seed(1)
    for step in range(300):
        cat, num = batch(256, seed=step)
        clean = (cat[:, 1] % 2).float()
        noisy = torch.randint(0, 2, (256,), generator=g).float()
        labels = torch.stack([clean, noisy], 1)
        _, per_task = masked_bce(module(cat, num)["logits"], labels, module.task_weights)
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


def test_pcgrad_projection_on_a_hand_computed_case() -> None:
    """g1 = [1, 0], g2 = [-1, 1] conflict (dot -1): g1 - (-1 / 2) g2 = [0.5, 0.5] and
    g2 - (-1 / 1) g1 = [0, 1]; a third, agreeing gradient is left alone."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    projected = project_conflicts(grads, torch.Generator().manual_seed(0))
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(project_conflicts(agreeing), agreeing)


def _grads(module: RankerModule) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def test_pcgrad_gradients_are_the_projected_task_gradients() -> None:
    """Checked against each task's gradient taken by its own backward pass: shared dense
    parameters get the sum of the projected task gradients, a tower only its task's, the
    embedding rows the plain weighted sum."""
    torch.manual_seed(0)
    make = lambda i, t: MMoE(i, t, num_experts=2, expert_hidden=[16], tower_hidden=[8])  # noqa: E731
    module = RankerModule(make, inputs=INPUTS, tasks=TASKS, loss_weighting="pcgrad")
    assert isinstance(module.weighting, PCGrad)
    cat, num = batch(64, seed=3)
    labels = torch.stack([(cat[:, 1] % 2).float(), 1 - (cat[:, 1] % 2).float()], 1)

    def per_task() -> torch.Tensor:
        return masked_bce(module(cat, num)["logits"], labels, module.task_weights)[1]

    alone = []
    for t in range(2):
        module.zero_grad()
        (per_task()[t] * module.task_weights[t]).backward()
        alone.append(_grads(module))
    module.zero_grad()
    module.weighting.backward(per_task(), torch.tensor([True, True]), *module.split_parameters())
    got = _grads(module)
    shared = sorted(set(alone[0]) & set(alone[1]))
    embedding = [n for n in shared if "embedding" in n]
    dense_shared = [n for n in shared if n not in embedding]
    assert embedding and dense_shared and any("towers.1" in n for n in alone[1])
    flat = torch.stack([torch.cat([a[n].flatten() for n in dense_shared]) for a in alone])
    assert (flat[0] @ flat[1]) < 0  # the planted tasks conflict
    order = torch.Generator().manual_seed(0)
    expected = project_conflicts(flat, order).sum(0).split([got[n].numel() for n in dense_shared])
    for name, value in zip(dense_shared, expected, strict=True):
        torch.testing.assert_close(got[name], value.view_as(got[name]), atol=1e-6, rtol=1e-5)
    for name in embedding:
        torch.testing.assert_close(got[name], alone[0][name] + alone[1][name])
    for name in set(alone[1]) - set(alone[0]):
        torch.testing.assert_close(got[name], alone[1][name])
    assert module.weighting.last_conflicts == 1.0
