"""Uplift metrics, exact and vectorised: Qini and uplift curves, their normalised areas, and the
uplift in the top k %, per task and per arm against control.

For rows sorted by predicted uplift, descending, and each distinct uplift value as a cut-off
(rows with equal scores enter together), with ``n_t(i), n_c(i)`` the treated and control rows
above the cut-off and ``r_t(i), r_c(i)`` their responders:

    Qini(i)   = r_t(i) - r_c(i) * n_t(i) / n_c(i)                       (Radcliffe 2007)
    uplift(i) = (r_t(i) / n_t(i) - r_c(i) / n_c(i)) * (n_t(i) + n_c(i))

(a ratio with a zero denominator is 0), from (0, 0). The normalised areas are

    qini_auc = (A(model) - A(random)) / (A(perfect) - A(random))

with ``A`` the trapezoidal area, ``random`` the straight line to the curve's end, and
``perfect`` the curve of the ideal order: for Qini, treated responders first and control
responders last (negative effects included); for the uplift curve, the order that scores
``2 [y = t] + (y if control responders outnumber treated non-responders else t)``. These are
the definitions of scikit-uplift 0.5's ``qini_auc_score`` (``negative_effect=True``) and
``uplift_auc_score``; a test checks ours against it on the same arrays. Row ``weights`` (e.g.
inverse propensities of logged data) weigh every count; without them the counts are rows.

``uplift_at_k``: in the ``k`` share of rows with the highest predicted uplift, the treated
response rate minus the control one (scikit-uplift's ``strategy="overall"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Curve = tuple[np.ndarray, np.ndarray]
TOP = (0.1, 0.3)  # the shares ``uplift_at_10`` and ``uplift_at_30`` are measured on


def _cumulative(
    y: np.ndarray, score: np.ndarray, treated: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, ...]:
    """At each distinct score, descending: rows (weights), treated rows, treated responders,
    control rows, control responders, all up to and including that score."""
    order = np.argsort(score, kind="mergesort")[::-1]
    y, score, treated = y[order], score[order], treated[order].astype(bool)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)[order]
    cut = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    n_t = np.cumsum(w * treated)[cut]
    n_c = np.cumsum(w * ~treated)[cut]
    r_t = np.cumsum(w * y * treated)[cut]
    r_c = np.cumsum(w * y * ~treated)[cut]
    return n_t + n_c, n_t, r_t, n_c, r_c


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def _from_origin(x: np.ndarray, v: np.ndarray) -> Curve:
    if len(x) == 0 or x[0] != 0 or v[0] != 0:
        return np.r_[0.0, x], np.r_[0.0, v]
    return x, v


def qini_curve(
    y: np.ndarray, score: np.ndarray, treated: np.ndarray, weights: np.ndarray | None = None
) -> Curve:
    n, n_t, r_t, n_c, r_c = _cumulative(y, score, treated, weights)
    return _from_origin(n, r_t - r_c * _ratio(n_t, n_c))


def uplift_curve(
    y: np.ndarray, score: np.ndarray, treated: np.ndarray, weights: np.ndarray | None = None
) -> Curve:
    n, n_t, r_t, n_c, r_c = _cumulative(y, score, treated, weights)
    return _from_origin(n, (_ratio(r_t, n_t) - _ratio(r_c, n_c)) * n)


def _normalised(actual: Curve, perfect: Curve) -> float:
    random = np.trapezoid([0.0, perfect[1][-1]], [0.0, perfect[0][-1]])
    best = np.trapezoid(perfect[1], perfect[0]) - random
    return float((np.trapezoid(actual[1], actual[0]) - random) / best) if best else float("nan")


def qini_auc(
    y: np.ndarray, score: np.ndarray, treated: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """The normalised area under the Qini curve (1 = the ideal order, 0 = random)."""
    t = treated.astype(np.float64)
    perfect = qini_curve(y, y * t - y * (1 - t), treated, weights)
    return _normalised(qini_curve(y, score, treated, weights), perfect)


def uplift_auc(
    y: np.ndarray, score: np.ndarray, treated: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """The normalised area under the uplift curve."""
    t = treated.astype(np.float64)
    control_responders = np.sum((y == 1) & (t == 0))
    treated_non_responders = np.sum((y == 0) & (t == 1))
    summand = y if control_responders > treated_non_responders else t
    perfect = uplift_curve(y, 2 * (y == t) + summand, treated, weights)
    return _normalised(uplift_curve(y, score, treated, weights), perfect)


def uplift_at_k(
    y: np.ndarray,
    score: np.ndarray,
    treated: np.ndarray,
    k: float,
    weights: np.ndarray | None = None,
) -> float:
    """Treated minus control response rate among the top ``k`` share by ``score``."""
    top = np.argsort(score, kind="mergesort")[::-1][: int(len(y) * k)]
    y, t = y[top], treated[top].astype(bool)
    w = np.ones(len(top)) if weights is None else np.asarray(weights, np.float64)[top]
    if not w[t].sum() or not w[~t].sum():
        return float("nan")
    return float(np.average(y[t], weights=w[t]) - np.average(y[~t], weights=w[~t]))


@dataclass(frozen=True)
class Pair:
    """One task of one arm against control: the rows of the two arms with the label observed,
    scored by ``p(arm) - p(control)``."""

    task: str
    arm: str
    y: np.ndarray
    score: np.ndarray
    treated: np.ndarray
    weights: np.ndarray | None

    @property
    def both(self) -> bool:
        """Whether both arms have rows (else no metric is defined)."""
        return bool(self.treated.any() and (~self.treated).any())


def pairs(
    arm_probabilities: np.ndarray,
    labels: np.ndarray,
    treatment: np.ndarray,
    arms: Sequence[str],
    tasks: Sequence[str],
    propensity: np.ndarray | None = None,
) -> Iterator[Pair]:
    """Every (arm, task) against control, arm 0. ``arm_probabilities [N, A, T]``, ``labels
    [N, T]`` (NaN = not observed), ``treatment [N]`` (arm index), ``propensity [N]`` (None:
    randomised data; else rows weigh its inverse)."""
    weights = None if propensity is None else 1.0 / np.asarray(propensity, np.float64)
    for m, arm in enumerate(arms[1:], start=1):
        pair = (treatment == 0) | (treatment == m)
        for k, task in enumerate(tasks):
            rows = pair & ~np.isnan(labels[:, k])
            p = arm_probabilities[rows][:, [0, m], k].astype(np.float64)
            yield Pair(
                task,
                arm,
                labels[rows, k].astype(np.float64),
                p[:, 1] - p[:, 0],
                treatment[rows] == m,
                None if weights is None else weights[rows],
            )


def uplift_metrics(
    arm_probabilities: np.ndarray,
    labels: np.ndarray,
    treatment: np.ndarray,
    arms: Sequence[str],
    tasks: Sequence[str],
    propensity: np.ndarray | None = None,
) -> dict[str, float]:
    """Per task and arm (``pairs``): ``qini/<task>/<arm>``, ``auuc/...``, ``uplift_at_10/...``,
    ``uplift_at_30/...``; and each metric's mean over tasks and arms (``qini/mean``, ...)."""
    out: dict[str, float] = {}
    for p in pairs(arm_probabilities, labels, treatment, arms, tasks, propensity):
        args = (p.y, p.score, p.treated)
        name = f"{p.task}/{p.arm}"
        out[f"qini/{name}"] = qini_auc(*args, p.weights) if p.both else float("nan")
        out[f"auuc/{name}"] = uplift_auc(*args, p.weights) if p.both else float("nan")
        for share in TOP:
            key = f"uplift_at_{round(share * 100)}/{name}"
            out[key] = uplift_at_k(*args, share, p.weights) if p.both else float("nan")
    return with_means(out, ("qini", "auuc", *(f"uplift_at_{round(s * 100)}" for s in TOP)))


def with_means(out: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """``out`` with ``<metric>/mean``, the mean of each metric's finite values (NaN if none)."""
    for metric in metrics:
        values = [v for key, v in out.items() if key.startswith(metric + "/")]
        finite = np.isfinite(values).any()
        out[f"{metric}/mean"] = float(np.nanmean(values)) if finite else math.nan
    return out


def qini_points(
    y: np.ndarray,
    score: np.ndarray,
    treated: np.ndarray,
    weights: np.ndarray | None = None,
    points: int = 101,
) -> dict[str, list[float]]:
    """The Qini curves of ``score`` and of the ideal order at ``points`` shares of the rows
    targeted (0 to 1), for a plot: ``share``, ``model``, ``perfect`` (incremental responders;
    the random order is the straight line to the model's end)."""
    share = np.linspace(0.0, 1.0, points)
    t = treated.astype(np.float64)
    out = {"share": share.tolist()}
    for name, order in (("model", score), ("perfect", y * t - y * (1 - t))):
        x, v = qini_curve(y, order, treated, weights)
        out[name] = np.interp(share, x / x[-1], v).tolist()
    return out


def qini_curves(
    arm_probabilities: np.ndarray,
    labels: np.ndarray,
    treatment: np.ndarray,
    arms: Sequence[str],
    tasks: Sequence[str],
    propensity: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``qini_points`` of every ``pairs`` with rows of both arms: ``{task: {arm: points}}``."""
    curves: dict[str, dict[str, dict[str, list[float]]]] = {t: {} for t in tasks}
    for p in pairs(arm_probabilities, labels, treatment, arms, tasks, propensity):
        if p.both:
            curves[p.task][p.arm] = qini_points(p.y, p.score, p.treated, p.weights)
    return curves


def effect_errors(
    predicted: np.ndarray, true: np.ndarray, arms: Sequence[str], tasks: Sequence[str]
) -> dict[str, float]:
    """Against known true effects (generated data), per task and arm against control, with
    ``tau = p(arm) - p(control)`` per row (``[N, A, T]`` probabilities, rows aligned):
    ``pehe/<task>/<arm>`` = sqrt(mean((tau_predicted - tau_true)^2)) (Hill 2011) and
    ``effect_corr/<task>/<arm>``, their Pearson correlation; each one's ``/mean``."""
    out: dict[str, float] = {}
    tau = predicted[:, 1:].astype(np.float64) - predicted[:, :1]  # [N, A-1, T]
    truth = true[:, 1:].astype(np.float64) - true[:, :1]
    for m, arm in enumerate(arms[1:]):
        for k, task in enumerate(tasks):
            a, b = tau[:, m, k], truth[:, m, k]
            out[f"pehe/{task}/{arm}"] = float(np.sqrt(np.mean((a - b) ** 2)))
            both = a.std() > 0 and b.std() > 0
            out[f"effect_corr/{task}/{arm}"] = float(np.corrcoef(a, b)[0, 1]) if both else math.nan
    return with_means(out, ("pehe", "effect_corr"))
