"""Sharded metrics across 3 gloo processes equal the single-process metrics of all the rows."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ranker.metrics import task_metrics
from ranker.sharded_metrics import sharded_task_metrics, sharded_uplift_metrics
from ranker.uplift_metrics import uplift_metrics
from tests.ranker.test_metrics import make_multitask
from tests.serving.conftest import free_port

TASKS = ["click", "like", "share", "never_observed", "nan_score"]
WORLD = 3


def _rank(rank: int, port: int, bounds: list[int], data: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        arrays = np.load(data)
        rows = slice(bounds[rank], bounds[rank + 1])
        metrics = sharded_task_metrics(
            arrays["probs"][rows], arrays["labels"][rows], arrays["users"][rows], TASKS
        )
        (out / f"{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def sharded(
    tmp_path: Path, probs: np.ndarray, labels: np.ndarray, users: np.ndarray, bounds: list[int]
) -> list[dict[str, float] | None]:
    data = tmp_path / "rows.npz"
    np.savez(data, probs=probs, labels=labels, users=users)
    mp.spawn(_rank, args=(free_port(), bounds, data, tmp_path), nprocs=WORLD)
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("bounds", [[0, 700, 2000, 2000], [0, 1, 1999, 2000]])
def test_sharded_metrics_equal_those_of_all_rows_in_one_process(
    tmp_path: Path, bounds: list[int]
) -> None:
    rng = np.random.default_rng(11)
    probs, labels, users = make_multitask(rng, 2000, TASKS)  # scores to 2 decimals: many ties
    labels[:, 3] = np.nan
    probs[1500, 4] = np.nan  # a diverged model: that task's metrics are NaN, the others not
    labels[1500, 4] = 1.0
    expected = task_metrics(probs, labels, users, TASKS)
    results = sharded(tmp_path, probs, labels, users, bounds)
    assert results[0] == results[1] == results[2]  # every rank reports the same
    got = results[0]
    assert set(got) == set(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert not math.isnan(got["auc/click"]) and math.isnan(got["auc/nan_score"])
    assert got["count/nan_score"] == expected["count/nan_score"] > 0


def test_sharded_metrics_of_no_rows_anywhere(tmp_path: Path) -> None:
    empty = np.zeros((0, len(TASKS)), np.float32)
    results = sharded(tmp_path, empty, empty, np.zeros(0, np.int64), [0, 0, 0, 0])
    assert results == [None, None, None]


def _uplift_rank(rank: int, port: int, bounds: list[int], data: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a = np.load(data)
        rows = slice(bounds[rank], bounds[rank + 1])
        metrics = sharded_uplift_metrics(
            a["probs"][rows], a["labels"][rows], a["treatment"][rows], ARMS, TASKS[:2],
            a["propensity"][rows],
        )  # fmt: skip
        (out / f"{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


ARMS = ["control", "email", "coupon"]


@pytest.mark.parametrize("logged", [False, True])
def test_sharded_uplift_metrics_equal_those_of_all_rows(tmp_path: Path, logged: bool) -> None:
    rng = np.random.default_rng(5)
    n = 3000
    probs = rng.random((n, 3, 2)).round(2).astype(np.float32)  # ties
    labels = (rng.random((n, 2)) < 0.3).astype(np.float32)
    labels[rng.random(n) < 0.1, 1] = np.nan
    treatment = rng.integers(0, 3, n)
    propensity = rng.uniform(0.2, 1.0, n).astype(np.float32) if logged else np.ones(n, np.float32)
    expected = uplift_metrics(
        probs, labels, treatment, ARMS, TASKS[:2], propensity if logged else None
    )
    data = tmp_path / "rows.npz"
    np.savez(data, probs=probs, labels=labels, treatment=treatment, propensity=propensity)
    bounds = [0, 0, 1200, n]  # rank 0 holds no row
    mp.spawn(_uplift_rank, args=(free_port(), bounds, data, tmp_path), nprocs=WORLD)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == results[1] == results[2]
    assert results[0] == pytest.approx(expected, rel=1e-12, abs=1e-12, nan_ok=True)
    assert math.isfinite(expected["qini/mean"])
