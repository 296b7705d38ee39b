"""The multi-task loss: the weighted sum over tasks of BCE on observed labels only, with the
task weights fixed (the dataset's) or learned, or the tasks' gradients de-conflicted
(``WEIGHTINGS``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, labels [B, T] (labels NaN = not observed), weights [T] -> (total, per-task [T]).

    A missing label is masked out of its task's mean, never treated as a negative; a task with
    no observed label in the batch contributes 0. ``row_weights`` [B] (e.g. inverse
    propensities of logged uplift data) make each task's mean a weighted one.
    """
    observed = ~torch.isnan(labels)
    targets = torch.where(observed, labels, torch.zeros_like(labels))
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    counted = observed.to(losses.dtype)
    if row_weights is not None:
        counted = counted * row_weights[:, None]
    losses = torch.where(observed, losses * counted, torch.zeros_like(losses))
    per_task = losses.sum(0) / counted.sum(0).clamp(min=1e-12 if row_weights is not None else 1)
    return (per_task * weights).sum(), per_task


class FixedWeights(nn.Module):
    """``L = sum_t w_t L_t`` with the dataset's task weights ``w_t``."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.clone(), persistent=False)  # the dataset's

    def forward(self, per_task: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``per_task`` losses ``[T]``; ``present`` ``[T]``: tasks observed in the batch."""
        return (per_task * self.weights).sum()

    def current(self) -> torch.Tensor:
        """The weight each task's loss has now, ``[T]``."""
        return self.weights


class UncertaintyWeights(FixedWeights):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): each task learns its
    homoscedastic noise ``s_t = log sigma_t^2`` and

        L = sum_t w_t (exp(-s_t) L_t + s_t / 2)

    so a noisy task (a high irreducible loss) learns a large ``sigma_t`` and a small weight
    ``w_t exp(-s_t)``; the ``s_t / 2`` term keeps the weights from collapsing to zero.
    ``s_t`` starts at 0 (every weight ``w_t``).
    """

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__(weights)
        self.log_variance = nn.Parameter(torch.zeros_like(weights))

    def forward(self, per_task: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        # A task with no label in the batch adds nothing, not even s_t / 2 (which alone
        # would push its weight up batch after batch).
        s = self.log_variance
        terms = self.weights * (torch.exp(-s) * per_task + s / 2)
        return (terms if present is None else terms * present).sum()

    def current(self) -> torch.Tensor:
        return self.weights * torch.exp(-self.log_variance.detach())


def project_conflicts(grads: torch.Tensor, order: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's projection: task gradients ``[T, P]`` -> de-conflicted ``[T, P]``.

    For each task ``i`` and every other task ``j`` in a random order, where the two conflict
    (``g_i . g_j < 0``), ``g_i`` loses its component along ``g_j``:

        g_i <- g_i - (g_i . g_j / |g_j|^2) g_j

    ``g_i`` is the running (projected) gradient, ``g_j`` the original one, as in the paper's
    Algorithm 1.
    """
    projected = grads.clone()
    norms = (grads * grads).sum(1)
    for i in range(len(grads)):
        for j in torch.randperm(len(grads), generator=order).tolist():
            if j == i or norms[j] == 0:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / norms[j] * grads[j]
    return projected


class PCGrad(FixedWeights):
    """Projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020): the loss is the fixed weighted sum, but its gradient on the
    **shared** dense parameters (those two or more tasks reach) is
    ``sum_i project_conflicts(g)_i`` with ``g_i = grad(w_i L_i)``: no task's step moves
    against another's. A parameter only one task reaches (its tower, its gate) gets that
    task's gradient. The embedding rows receive the plain weighted sum: their gradients are
    sparse, and projecting them would need every task's dense copy of the tables.

    A model's auxiliary loss (``extra``: a balance or contrastive term) is added to the
    result unprojected. Costs one backward pass per task present in the batch, plus one.
    ``last_conflicts`` is the share of task pairs whose gradients conflicted in the last step.
    """

    def __init__(self, weights: torch.Tensor, seed: int = 0) -> None:
        super().__init__(weights)
        self.order = torch.Generator().manual_seed(seed)
        self.last_conflicts = 0.0

    def backward(
        self,
        per_task: torch.Tensor,
        present: torch.Tensor,
        dense: Sequence[torch.Tensor],
        sparse: Sequence[torch.Tensor],
        extra: torch.Tensor | None = None,
    ) -> None:
        """Sets ``.grad`` of the ``dense`` and ``sparse`` parameters for
        ``self(per_task) + extra``."""
        weighted = per_task * self.weights
        tasks = [t for t in range(len(weighted)) if present[t]]
        grads = [
            torch.autograd.grad(weighted[t], dense, retain_graph=True, allow_unused=True)
            for t in tasks
        ]
        shared = [k for k in range(len(dense)) if sum(g[k] is not None for g in grads) > 1]
        own = {k: [g[k] for g in grads if g[k] is not None] for k in range(len(dense))}
        self.last_conflicts = 0.0
        if shared:
            flat = torch.stack(
                [torch.cat([_dense(g[k], dense[k]).flatten() for k in shared]) for g in grads]
            )
            cosines = torch.nn.functional.normalize(flat, dim=1)
            pairs = len(tasks) * (len(tasks) - 1)
            conflicts = ((cosines @ cosines.T) < 0).sum().item()
            self.last_conflicts = conflicts / pairs if pairs else 0.0
            summed = project_conflicts(flat, self.order).sum(0)
            sizes = [dense[k].numel() for k in shared]
            for k, part in zip(shared, summed.split(sizes), strict=True):
                own[k] = [part.view_as(dense[k])]
        if extra is not None and extra.requires_grad:
            unprojected = torch.autograd.grad(extra, dense, retain_graph=True, allow_unused=True)
            for k, grad in enumerate(unprojected):
                own[k] = own[k] if grad is None else [sum(own[k], grad)]
        for k, parts in own.items():
            if parts:  # one: the projected sum of a shared parameter, or its one task's
                dense[k].grad = parts[0]
        total = weighted.sum() if extra is None else weighted.sum() + extra
        torch.autograd.backward(total, inputs=list(sparse))


def _dense(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad


WEIGHTINGS: dict[str, type[FixedWeights]] = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeights,
    "pcgrad": PCGrad,
}
