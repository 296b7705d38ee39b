"""Post-hoc per-task calibration, fitted on validation, carried by the model into export.

A trained ranker's probabilities can be well ordered (AUC) yet off in level (a sparse task's
mean prediction 1.5x its rate after one epoch): a weighted-product fusion then favours the
wrong candidates. Each task ``t`` gets a map of its logit ``z``:

- ``platt`` (Platt 1999): ``p = sigmoid(a_t z + b_t)``, ``(a_t, b_t)`` the logistic regression
  of the validation labels on the logits;
- ``temperature`` (Guo et al., ICML 2017): ``p = sigmoid(z / T_t)``, ``b_t = 0``;
- ``none``: ``a_t = 1, b_t = 0``.

Fitted by Newton's method on the observed labels of the split (vectorised over rows, a few
iterations per task), so it minimises the validation logloss for its family; it never changes
the order of a task's scores (``a_t > 0`` is enforced), so AUC and GAUC stay as they were.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

Method = Literal["none", "platt", "temperature"]
METHODS: tuple[str, ...] = ("none", "platt", "temperature")


class Calibrator(nn.Module):
    """``logits [B, T] -> a * logits + b`` per task; the identity until fitted."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(tasks))
        self.register_buffer("bias", torch.zeros(tasks))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale + self.bias

    def set(self, scale: np.ndarray, bias: np.ndarray) -> None:
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.bias.copy_(torch.as_tensor(bias, dtype=self.bias.dtype))


def fit(logits: np.ndarray, labels: np.ndarray, method: Method) -> tuple[np.ndarray, np.ndarray]:
    """``(scale [T], bias [T])`` minimising each task's logloss on its observed labels (NaN =
    not observed); a task with one class only (or none) keeps the identity."""
    if method not in METHODS:
        raise ValueError(f"calibration {method!r} is not one of {list(METHODS)}")
    tasks = logits.shape[1]
    scale, bias = np.ones(tasks), np.zeros(tasks)
    if method == "none":
        return scale, bias
    for t in range(tasks):
        observed = ~np.isnan(labels[:, t])
        z = logits[observed, t].astype(np.float64)
        y = labels[observed, t].astype(np.float64)
        if len(y) == 0 or y.min() == y.max():
            continue
        scale[t], bias[t] = _newton(z, y, with_bias=method == "platt")
    return scale, bias


def _newton(z: np.ndarray, y: np.ndarray, with_bias: bool, steps: int = 50) -> tuple[float, float]:
    """Logistic regression of ``y`` on ``[z, 1]`` (or ``z`` alone), from the identity, by
    Newton steps halved until the logloss falls (a full step can overshoot where the
    probabilities saturate). Where it would reverse or flatten the order (a scale <= 0: the
    model ranks this task no better than chance), the scale stays 1 and only the bias is
    fitted (``platt``; ``temperature`` keeps the identity)."""
    x = np.stack([z, np.ones_like(z)], 1) if with_bias else z[:, None]
    w = _minimise(x, np.zeros_like(z), y, np.eye(x.shape[1])[0], steps)
    if w[0] > 0:
        return float(w[0]), float(w[1]) if with_bias else 0.0
    if not with_bias:
        return 1.0, 0.0
    (b,) = _minimise(np.ones_like(z)[:, None], z, y, np.zeros(1), steps)
    return 1.0, float(b)


def _minimise(
    x: np.ndarray, offset: np.ndarray, y: np.ndarray, w: np.ndarray, steps: int
) -> np.ndarray:
    """``argmin_w mean(log(1 + e^s) - y s)``, ``s = offset + x w``, by damped Newton steps."""

    def loss(w: np.ndarray) -> float:
        s = offset + x @ w  # computed stably
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    current = loss(w)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(offset + x @ w, -50, 50)))
        gradient = x.T @ (p - y)
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        for _ in range(30):
            trial = loss(w - step)
            if trial <= current:
                break
            step = step / 2
        else:
            break  # no step lowers the loss: converged
        w, improvement, current = w - step, current - trial, trial
        if improvement < 1e-12:
            break
    return w
