"""Fitting a trained model's per-task calibration on the validation split (after ``fit``)."""

from __future__ import annotations

import numpy as np

from features.contract import LOGITS
from features.datamodule import RankerDataModule
from ranker.calibration import fit
from ranker.metrics import task_metrics
from ranker.module import RankerModule
from ranker.scoring import probabilities, score


def validation_logits(
    module: RankerModule, data: RankerDataModule
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The network's raw logits, labels and users of the whole validation split (every row,
    also under DDP: each rank reads the whole split, so each fits the same calibration)."""
    dataset = data.dataset("val")
    world, dataset.world = dataset.world, (1, 0)
    try:
        scored = score(module.network, dataset, rows=dataset.rows)
    finally:
        dataset.world = world
    tasks = len(module.tasks)  # (0, T) arrays when the split has no row
    return scored.output(LOGITS, tasks), scored.labels.reshape(-1, tasks), scored.users


def calibrate(module: RankerModule, data: RankerDataModule) -> dict[str, float]:
    """Fit ``module.calibrator`` (its ``calibration`` method) on the validation split; the
    fitted parameters and the split's ECE / calibration before and after, as metrics."""
    logits, labels, users = validation_logits(module, data)
    scale, bias = fit(logits, labels, module.hparams.calibration)
    module.calibrator.set(scale, bias)
    tasks = module.task_names
    before = task_metrics(probabilities(logits), labels, users, tasks)
    after = task_metrics(probabilities(logits, module.calibrator), labels, users, tasks)
    module.last_metrics["val"] = after
    out = {}
    for t, task in enumerate(tasks):
        out[f"calibration/scale/{task}"] = float(scale[t])
        out[f"calibration/bias/{task}"] = float(bias[t])
    for task in [*tasks, "mean"]:
        for metric in ("ece", "calibration", "logloss"):
            out[f"calibration/val/{metric}_before/{task}"] = before[f"{metric}/{task}"]
            out[f"calibration/val/{metric}_after/{task}"] = after[f"{metric}/{task}"]
    return out
