"""Post-hoc calibration (ranker/calibration.py) on planted mis-calibrated scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranker.calibration import Calibrator, fit
from ranker.metrics import task_metrics


def planted(n: int = 40_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True logits, labels drawn from them, and an over-confident, shifted model: 2 z + 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.2, (n, 3))
    labels = (rng.random((n, 3)) < 1 / (1 + np.exp(-z))).astype(np.float32)
    labels[rng.random(n) < 0.3, 1] = np.nan  # a task observed on 70% of the rows
    labels[:, 2] = 0.0  # a task with one class only: nothing to fit
    return z, labels, 2 * z + 1


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_platt_recovers_the_planted_map_and_lowers_ece() -> None:
    z, labels, model = planted()
    scale, bias = fit(model, labels, "platt")
    np.testing.assert_allclose(scale[:2], 0.5, atol=0.03)
    np.testing.assert_allclose(bias[:2], -0.5, atol=0.05)
    assert (scale[2], bias[2]) == (1.0, 0.0)
    users = np.arange(len(z)) % 100
    tasks = ["a", "b", "c"]
    before = task_metrics(sigmoid(model), labels, users, tasks)
    after = task_metrics(sigmoid(model * scale + bias), labels, users, tasks)
    for task in ("a", "b"):
        assert after[f"ece/{task}"] < 0.3 * before[f"ece/{task}"]
        assert abs(after[f"calibration/{task}"] - 1) < 0.02 < abs(before[f"calibration/{task}"] - 1)
        assert after[f"auc/{task}"] == before[f"auc/{task}"]  # the order is untouched


def test_temperature_only_scales() -> None:
    z, labels, _ = planted()
    scale, bias = fit(3 * z, labels, "temperature")  # over-confident by 3x, no shift
    np.testing.assert_allclose(scale[:2], 1 / 3, atol=0.02)
    assert (bias == 0).all()
    assert fit(z, labels, "none")[0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="calibration 'isotonic' is not one of"):
        fit(z, labels, "isotonic")


def test_the_calibrator_is_the_identity_until_set() -> None:
    calibrator = Calibrator(2)
    logits = torch.tensor([[0.3, -1.0]])
    torch.testing.assert_close(calibrator(logits), logits)
    calibrator.set(np.array([0.5, 2.0]), np.array([0.1, 0.0]))
    torch.testing.assert_close(calibrator(logits), torch.tensor([[0.25, -2.0]]))
    assert set(calibrator.state_dict()) == {"scale", "bias"}  # saved with the model


def test_a_model_that_ranks_backwards_keeps_its_order_and_gets_its_level_right() -> None:
    """Scores anti-correlated with the labels (as a barely trained model's on a rare task):
    the order is never reversed (scale 1), but the bias alone brings the mean prediction to
    the label rate, where the identity left it far off."""
    z, labels, _ = planted()
    backwards = 3.0 - z  # higher score, fewer positives; mean prediction far above the rate
    scale, bias = fit(backwards, labels, "platt")
    assert scale[0] == 1.0 and bias[0] < -1.0
    observed = labels[:, 0]
    before = sigmoid(backwards[:, 0]).mean() / observed.mean()
    after = sigmoid(backwards[:, 0] + bias[0]).mean() / observed.mean()
    assert before > 2.0 and abs(after - 1) < 0.01
    assert fit(backwards, labels, "temperature")[0][0] == 1.0  # no bias to fit: the identity
