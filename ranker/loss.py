"""The multi-task loss: the weighted sum over tasks of BCE on observed labels only, with the
task weights fixed (the dataset's) or learned (``WEIGHTINGS``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_bce(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, labels [B, T] (labels NaN = not observed), weights [T] -> (total, per-task [T]).

    A missing label is masked out of its task's mean, never treated as a negative; a task with
    no observed label in the batch contributes 0.
    """
    observed = ~torch.isnan(labels)
    targets = torch.where(observed, labels, torch.zeros_like(labels))
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    losses = torch.where(observed, losses, torch.zeros_like(losses))
    per_task = losses.sum(0) / observed.sum(0).clamp(min=1)
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


WEIGHTINGS: dict[str, type[FixedWeights]] = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeights,
}
