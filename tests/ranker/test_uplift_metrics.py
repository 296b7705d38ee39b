"""Uplift metrics: equal to scikit-uplift's on the same arrays; a planted effect is found and a
null one is not."""

from __future__ import annotations

import numpy as np
import pytest
from sklift.metrics import qini_auc_score, uplift_auc_score
from sklift.metrics import uplift_at_k as sklift_uplift_at_k

from ranker.uplift_metrics import qini_auc, uplift_at_k, uplift_auc, uplift_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_qini_auuc_and_uplift_at_k_equal_scikit_uplift(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    treated = rng.integers(0, 2, n)
    score = rng.normal(size=n)
    if ties:  # scores in few distinct values: ties enter the curves together
        score = np.round(score, 1)
    y = (rng.random(n) < 0.2 + 0.1 * treated * (score > 0)).astype(float)
    assert qini_auc(y, score, treated) == pytest.approx(
        qini_auc_score(y, score, treated), abs=1e-12
    )
    assert uplift_auc(y, score, treated) == pytest.approx(
        uplift_auc_score(y, score, treated), abs=1e-12
    )
    for k in (0.1, 0.3):
        ours = uplift_at_k(y, score, treated, k)
        theirs = sklift_uplift_at_k(y, score, treated, strategy="overall", k=k)
        if not ties:  # scikit-uplift breaks ties at the cut by position, as we do, when unique
            assert ours == pytest.approx(theirs, abs=1e-12)


def test_a_planted_effect_is_found_and_a_null_one_is_not() -> None:
    rng = np.random.default_rng(0)
    n = 40_000
    x = rng.normal(size=n)
    arm = rng.integers(0, 3, n)  # 0 control; arm 1 helps where x > 0; arm 2 does nothing
    base = 1 / (1 + np.exp(-(x - 1)))
    effect = np.where((arm == 1) & (x > 0), 0.2, 0.0)
    labels = (rng.random(n) < base + effect).astype(np.float32)[:, None]
    # A model that knows the truth: arm 1's probability is raised where x > 0, arm 2's is not.
    probabilities = np.stack([base, base + 0.2 * (x > 0), base + 0.001 * x], 1)[:, :, None]
    metrics = uplift_metrics(probabilities, labels, arm, ["none", "one", "two"], ["visit"])
    # Normalised by the ideal order of the outcomes themselves, a strong real effect is ~0.1.
    assert metrics["qini/visit/one"] > 0.06
    assert abs(metrics["qini/visit/two"]) < 0.015
    assert metrics["uplift_at_10/visit/one"] == pytest.approx(0.2, abs=0.03)
    assert metrics["qini/mean"] == pytest.approx(
        (metrics["qini/visit/one"] + metrics["qini/visit/two"]) / 2
    )


def test_weights_of_one_change_nothing_and_unobserved_labels_are_left_out() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    arm = rng.integers(0, 2, n)
    labels = (rng.random((n, 1)) < 0.3).astype(np.float32)
    probabilities = rng.random((n, 2, 1)).astype(np.float32)
    plain = uplift_metrics(probabilities, labels, arm, ["c", "t"], ["a"])
    weighted = uplift_metrics(probabilities, labels, arm, ["c", "t"], ["a"], np.ones(n))
    assert plain == pytest.approx(weighted)
    hidden = labels.copy()
    hidden[:100] = np.nan
    left_out = uplift_metrics(probabilities, hidden, arm, ["c", "t"], ["a"])
    kept = uplift_metrics(probabilities[100:], labels[100:], arm[100:], ["c", "t"], ["a"])
    assert left_out == pytest.approx(kept)
