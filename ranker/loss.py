"""The multi-task loss: the weighted sum over tasks of BCE on observed labels only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
