"""Tests for ranker.metrics against brute-force / straightforward reference implementations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ranker.metrics import (
    METRICS,
    auc,
    calibration,
    ece,
    gauc,
    logloss,
    metrics_by_history,
    reliability,
    task_metrics,
)

SEEDS = range(12)


# ----------------------------------------------------------------------------- references
def ref_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """O(n_pos * n_neg) pairwise AUC, ties count 1/2."""
    pos = scores[labels > 0.5]
    neg = scores[labels <= 0.5]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size))


def ref_gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Python loop over users: impression-weighted mean of per-user AUC."""
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        a = ref_auc(scores[m], labels[m])
        if not math.isnan(a):
            num += m.sum() * a
            den += m.sum()
    return num / den if den else math.nan


def ref_unweighted_gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    aucs = [ref_auc(scores[groups == g], labels[groups == g]) for g in np.unique(groups)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def ref_logloss(p: np.ndarray, y: np.ndarray, eps: float = 1e-7) -> float:
    total = 0.0
    for pi, yi in zip(p.astype(float), y.astype(float), strict=True):
        pi = min(max(pi, eps), 1 - eps)
        total -= yi * math.log(pi) + (1 - yi) * math.log(1 - pi)
    return total / len(p)


def ref_ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        m = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        if m.any():
            total += m.sum() / p.size * abs(p[m].mean() - y[m].mean())
    return total


def random_case(
    rng: np.random.Generator, n: int, decimals: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tied scores, non-contiguous user ids, users of very different sizes, some 1-row users."""
    n_users = max(1, n // 6)
    user_ids = rng.choice(10**9, size=n_users, replace=False).astype(np.int64) - 5 * 10**8
    # Zipf-ish popularity -> uneven group sizes (and many single-row / single-class users).
    weights = 1.0 / np.arange(1, n_users + 1) ** 1.2
    groups = rng.choice(user_ids, size=n, p=weights / weights.sum())
    user_bias = rng.normal(size=n_users)
    bias = dict(zip(user_ids.tolist(), user_bias.tolist(), strict=True))
    base = np.array([bias[g] for g in groups.tolist()])
    labels = (rng.random(n) < 1 / (1 + np.exp(-base))).astype(np.float64)
    scores = np.round(rng.random(n) * 0.6 + 0.4 * labels * rng.random(n), decimals)
    return scores, labels, groups


# ----------------------------------------------------------------------------- auc
@pytest.mark.parametrize("seed", SEEDS)
def test_auc_matches_pairwise_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    scores, labels, _ = random_case(rng, n)
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    got = auc(scores, labels)
    assert got == pytest.approx(ref_auc(scores, labels), abs=1e-12)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert isinstance(got, float)


def test_auc_float32_and_large_ties() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 5000).astype(np.float32)
    labels = (rng.random(5000) < 0.3).astype(np.float32)
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([1.0, 1.0])))
    assert math.isnan(auc(np.array([0.1, 0.2]), np.array([0.0, 0.0])))
    assert math.isnan(auc(np.array([]), np.array([])))
    assert math.isnan(auc(np.array([0.1, np.nan]), np.array([0.0, 1.0])))
    assert auc(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == 0.5
    assert auc(np.array([0.1, 0.9]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.9, 0.1]), np.array([0.0, 1.0])) == 0.0
    with pytest.raises(ValueError):
        auc(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------- gauc
@pytest.mark.parametrize("seed", SEEDS)
def test_gauc_matches_python_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 600))
    scores, labels, groups = random_case(rng, n, decimals=int(rng.integers(0, 3)))
    got = gauc(scores, labels, groups)
    want = ref_gauc(scores, labels, groups)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


def test_gauc_row_order_and_id_invariance() -> None:
    rng = np.random.default_rng(7)
    scores, labels, groups = random_case(rng, 500)
    base = gauc(scores, labels, groups)
    perm = rng.permutation(500)
    assert gauc(scores[perm], labels[perm], groups[perm]) == pytest.approx(base, abs=1e-12)
    # Relabelling user ids (any int64 values) must not matter.
    _, inv = np.unique(groups, return_inverse=True)
    assert gauc(scores, labels, inv * 7919 - 3) == pytest.approx(base, abs=1e-12)


def test_gauc_is_impression_weighted_not_unweighted_mean() -> None:
    # User 10: 2 rows, AUC 0. User 99: 6 rows, AUC 1. User 5: one class only -> skipped.
    scores = np.array([0.9, 0.1, 0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.5, 0.6])
    labels = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    groups = np.array([10, 10, 99, 99, 99, 99, 99, 99, 5, 5], dtype=np.int64)
    assert gauc(scores, labels, groups) == pytest.approx((2 * 0.0 + 6 * 1.0) / 8)
    assert ref_unweighted_gauc(scores, labels, groups) == pytest.approx(0.5)

    rng = np.random.default_rng(3)
    s, y, g = random_case(rng, 800)
    assert gauc(s, y, g) == pytest.approx(ref_gauc(s, y, g), abs=1e-12)
    assert abs(gauc(s, y, g) - ref_unweighted_gauc(s, y, g)) > 1e-6


def test_gauc_edge_cases() -> None:
    g = np.array([1, 2, 3], dtype=np.int64)
    # Every user has a single row -> no user has both classes.
    assert math.isnan(gauc(np.array([0.1, 0.2, 0.3]), np.array([0.0, 1.0, 0.0]), g))
    assert math.isnan(gauc(np.array([]), np.array([]), np.array([], dtype=np.int64)))
    # Single user == plain AUC.
    rng = np.random.default_rng(0)
    s, y = np.round(rng.random(300), 1), (rng.random(300) < 0.4).astype(float)
    assert gauc(s, y, np.full(300, 42)) == pytest.approx(auc(s, y), abs=1e-12)


# ----------------------------------------------------------------------------- logloss etc.
@pytest.mark.parametrize("seed", SEEDS)
def test_logloss_calibration_ece_match_references(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(1, 500))
    p = rng.random(n).astype(np.float32)
    p[: n // 10] = 0.0  # exercise clipping
    p[n // 10 : n // 5] = 1.0
    y = (rng.random(n) < 0.4).astype(np.float32)
    assert logloss(p, y) == pytest.approx(ref_logloss(p, y), rel=1e-9)
    for bins in (1, 10, 15):
        want_ece = ref_ece(p.astype(float), y.astype(float), bins)
        assert ece(p, y, bins=bins) == pytest.approx(want_ece, abs=1e-12)
    if y.mean() > 0:
        want = float(np.mean(p.astype(float)) / np.mean(y.astype(float)))
        assert calibration(p, y) == pytest.approx(want, rel=1e-12)
    else:
        assert math.isnan(calibration(p, y))


def test_perfect_calibration_ece_near_zero() -> None:
    rng = np.random.default_rng(11)
    p = rng.random(400_000)
    y = (rng.random(p.size) < p).astype(np.float64)
    assert ece(p, y) < 0.01
    assert calibration(p, y) == pytest.approx(1.0, abs=0.01)
    # Exactly calibrated by construction: each bin's mean label equals its mean prob.
    p2 = np.repeat(np.arange(15) / 15 + 1 / 30, 30)
    y2 = np.repeat(p2[::30], 30)  # soft labels equal to the bin centre
    assert ece(p2, y2) == pytest.approx(0.0, abs=1e-12)


def test_scalar_metric_edge_cases() -> None:
    empty = np.array([])
    assert math.isnan(logloss(empty, empty))
    assert math.isnan(calibration(empty, empty))
    assert math.isnan(ece(empty, empty))
    assert math.isnan(calibration(np.array([0.2, 0.3]), np.array([0.0, 0.0])))
    assert np.isfinite(logloss(np.array([0.0, 1.0]), np.array([1.0, 0.0])))
    with pytest.raises(ValueError):
        ece(np.zeros(2), np.zeros(2), bins=0)


# ----------------------------------------------------------------------------- task_metrics
def make_multitask(
    rng: np.random.Generator, n: int, tasks: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = len(tasks)
    users = rng.choice(np.array([3, 17, 1001, 5000, 77777, 123456789]), size=n)
    users = np.where(rng.random(n) < 0.5, users, rng.integers(10**6, 10**6 + n // 4 + 1, n))
    labels = (rng.random((n, t)) < 0.3).astype(np.float64)
    probs = np.clip(0.6 * rng.random((n, t)) + 0.3 * labels, 0, 1).round(2).astype(np.float32)
    labels[rng.random((n, t)) < 0.3] = np.nan  # partially observed tasks
    return probs, labels, users.astype(np.int64)


def test_task_metrics_masks_nan_per_task_and_keys_complete() -> None:
    rng = np.random.default_rng(5)
    tasks = ["click", "like", "share", "never"]
    probs, labels, users = make_multitask(rng, 2000, tasks)
    labels[:, 3] = np.nan  # a task with no observed row at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning spam on all-nan task
        out = task_metrics(probs, labels, users, tasks)

    expected = {f"{m}/{t}" for m in METRICS for t in [*tasks, "mean"]}
    expected |= {f"{k}/{t}" for k in ("positive_rate", "count") for t in tasks}
    assert set(out) == expected
    assert all(type(v) is float for v in out.values())

    fns = {
        "auc": lambda p, y, u: auc(p, y),
        "gauc": gauc,
        "logloss": lambda p, y, u: logloss(p, y),
        "calibration": lambda p, y, u: calibration(p, y),
        "ece": lambda p, y, u: ece(p, y),
    }
    for j, t in enumerate(tasks[:3]):
        m = ~np.isnan(labels[:, j])
        p, y, u = probs[m, j], labels[m, j], users[m]
        for name, fn in fns.items():
            assert out[f"{name}/{t}"] == pytest.approx(fn(p, y, u), abs=1e-12), (name, t)
        assert out[f"gauc/{t}"] == pytest.approx(ref_gauc(p.astype(float), y, u), abs=1e-12)
        assert out[f"count/{t}"] == float(m.sum())
        assert out[f"positive_rate/{t}"] == pytest.approx(y.mean())

    for name in METRICS:
        assert math.isnan(out[f"{name}/never"])
        vals = [out[f"{name}/{t}"] for t in tasks[:3]]
        assert out[f"{name}/mean"] == pytest.approx(np.mean(vals), abs=1e-12)
    assert out["count/never"] == 0.0
    assert math.isnan(out["positive_rate/never"])


def test_task_metrics_all_nan_means_and_no_positives() -> None:
    probs = np.full((4, 2), 0.5)
    labels = np.array([[np.nan, 0.0], [np.nan, 0.0], [np.nan, 0.0], [np.nan, 0.0]])
    users = np.array([1, 1, 2, 2], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = task_metrics(probs, labels, users, ["a", "b"])
    for m in ("auc", "gauc", "calibration"):
        assert math.isnan(out[f"{m}/mean"])
    assert out["logloss/mean"] == pytest.approx(math.log(2))
    assert out["ece/mean"] == pytest.approx(0.5)


def test_task_metrics_shape_validation() -> None:
    with pytest.raises(ValueError):
        task_metrics(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(3, dtype=np.int64), ["a"])
    with pytest.raises(ValueError):
        task_metrics(np.zeros((3, 1)), np.zeros((3, 1)), np.zeros(2, dtype=np.int64), ["a"])


@pytest.mark.parametrize("n", [1, 7, 20, 999, 5000])
def test_reliability_bins_hold_equal_row_counts_of_sorted_predictions(n: int) -> None:
    rng = np.random.default_rng(n)
    p = rng.beta(0.5, 20, n)  # a rare task: most predictions near 0
    y = (rng.random(n) < p).astype(float)
    rows, pred, rate = reliability(p, y, bins=20)
    order = np.argsort(p, kind="stable")
    expected_bins = min(20, n)
    assert len(rows) == expected_bins and rows.sum() == n and rows.max() - rows.min() <= 1
    start = 0
    for b in range(expected_bins):  # the straightforward reference: walk the sorted rows
        members = order[start : start + rows[b]]
        assert pred[b] == pytest.approx(p[members].mean())
        assert rate[b] == pytest.approx(y[members].mean())
        start += rows[b]
    assert np.all(np.diff(pred) >= 0)
    assert (rows * rate).sum() == pytest.approx(y.sum())
    empty = reliability(np.zeros(0), np.zeros(0))
    assert all(len(a) == 0 for a in empty)


def test_task_metrics_same_from_float32_and_float64_inputs() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((500, 2)).astype(np.float32)
    labels = (rng.random((500, 2)) < 0.3).astype(np.float32)
    labels[::7, 1] = np.nan
    users = rng.integers(0, 40, 500)
    assert task_metrics(probs, labels, users, ["a", "b"]) == task_metrics(
        probs.astype(np.float64), labels.astype(np.float64), users, ["a", "b"]
    )


def test_metrics_by_history_bucket_the_rows_by_length() -> None:
    """Planted: the model is right for users with a long history, guesses for the others."""
    rng = np.random.default_rng(0)
    n = 4000
    lengths = rng.integers(0, 40, n)
    labels = rng.integers(0, 2, (n, 1)).astype(np.float32)
    long = lengths >= 20
    probs = np.where(long[:, None], labels * 0.8 + 0.1, rng.random((n, 1))).astype(np.float32)
    users = rng.integers(0, 50, n)
    got = metrics_by_history(probs, labels, users, lengths, ["click"])
    assert list(got) == ["0", "1-4", "5-19", "20+"]
    assert sum(m["rows"] for m in got.values()) == n
    assert got["20+"]["auc/click"] == 1.0 and abs(got["5-19"]["auc/click"] - 0.5) < 0.06
    rows = (lengths >= 1) & (lengths <= 4)
    expected = task_metrics(probs[rows], labels[rows], users[rows], ["click"])
    assert got["1-4"]["gauc/click"] == expected["gauc/click"]
    assert list(metrics_by_history(probs, labels, users, lengths + 5, ["click"])) == ["5-19", "20+"]
