"""Vectorised offline metrics for multi-task ranking (numpy only).

Definitions (all computed in float64, whatever the input dtype):

* ``auc``: ROC AUC as the Mann-Whitney statistic, i.e. the probability that a random
  positive scores above a random negative, with tied scores counting 1/2 (equivalent to
  average ranks for ties). ``nan`` when either class is absent.
* ``gauc``: group AUC = impression-weighted mean of per-user AUC over users that have both
  classes: ``sum_u n_u * AUC_u / sum_u n_u`` where ``n_u`` is the user's number of rows
  (impressions). Users with a single class (including single-row users) are skipped;
  ``nan`` if no user qualifies.
* ``logloss``: mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]``.
* ``calibration``: ``mean(prob) / mean(label)``; 1.0 is perfectly calibrated on average,
  ``nan`` when the mean label is 0.
* ``ece``: expected calibration error over ``bins`` equal-width bins on [0, 1]
  (bin ``b`` is ``[b/B, (b+1)/B)``, the last one closed; probabilities outside [0, 1] fall
  into the edge bins): ``sum_b n_b / N * |mean p_b - mean y_b|``.

Labels are binarised as ``label > 0.5`` for the ranking metrics (``auc``, ``gauc``) and used
as-is (they may be soft) for ``logloss``, ``calibration`` and ``ece``. Every metric returns
``nan`` on empty input instead of warning. ``auc``/``gauc`` return ``nan`` if any score is
NaN, rather than silently ranking NaNs last.

``task_metrics`` evaluates every metric in ``METRICS`` per task on ``[N, T]`` arrays where a
NaN label means "not observed for that task" and is masked for that task only. It builds each
task's metrics (``finish``) from parts that add up across shards of rows: ``additive_sums``
(any rows), ``gauc_parts`` (whole users), ``auc_parts`` (score ranges), which is how
``ranker.sharded_metrics`` computes the same metrics across DDP ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "METRICS",
    "auc",
    "calibration",
    "ece",
    "gauc",
    "logloss",
    "reliability",
    "task_metrics",
]

METRICS: tuple[str, ...] = ("auc", "gauc", "logloss", "calibration", "ece")
ECE_BINS = 15

_NAN = float("nan")


def _as_f64(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr.reshape(-1)


def _check_same_len(*arrays: np.ndarray) -> None:
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"length mismatch: {[a.shape[0] for a in arrays]}")


def _dense_codes(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary group ids to 0..G-1 so per-group sums can use bincount."""
    uniq, codes = np.unique(groups, return_inverse=True)
    return codes.reshape(-1), int(uniq.size)


def _group_score_order(
    scores: np.ndarray, codes: np.ndarray, n_groups: int, score_order: np.ndarray | None = None
) -> np.ndarray:
    """Permutation sorting rows by (group, score), equivalent to ``np.lexsort((scores, codes))``.

    Done as an (unstable, fast) argsort on scores followed by a *stable* argsort on the
    group codes. Casting the dense codes to the narrowest unsigned dtype lets numpy use its
    O(n) radix sort for <= 65536 groups; this is several times faster than lexsort.
    ``score_order`` lets callers reuse an argsort of ``scores`` they already computed.
    """
    order = np.argsort(scores) if score_order is None else score_order
    if n_groups <= 1:
        return order
    dtype = np.min_scalar_type(n_groups - 1)
    by_group = np.argsort(codes[order].astype(dtype, copy=False), kind="stable")
    return order[by_group]


def _sorted_group_auc(
    s: np.ndarray, y: np.ndarray, g: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group Mann-Whitney sums from rows already sorted by (group, score).

    ``s``: sorted scores, ``y``: sorted bool labels, ``g``: sorted group codes (None = one
    group). Returns per-group ``(num, n_pos, n_neg, size)`` with ``AUC = num / (n_pos*n_neg)``.
    ``num`` counts, for every positive, the negatives of its group scored strictly below plus
    half the negatives tied with it -- i.e. the average-rank formulation, done per tie run.
    """
    n = s.shape[0]
    new_group = np.zeros(n, dtype=bool)
    new_group[0] = True
    if g is not None:
        np.not_equal(g[1:], g[:-1], out=new_group[1:])
    # A tie run starts at a group boundary or wherever the score changes.
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]

    run_start = np.flatnonzero(new_run)
    y_int = y.astype(np.int64)
    run_pos = np.add.reduceat(y_int, run_start)
    run_len = np.diff(np.append(run_start, n))
    run_neg = run_len - run_pos

    group_start = np.flatnonzero(new_group)
    run_is_group_start = new_group[run_start]
    group_of_run = np.cumsum(run_is_group_start) - 1
    # Negatives strictly before each run *within its group*: global exclusive cumsum minus
    # its value at the group's first run.
    neg_excl = np.cumsum(run_neg) - run_neg
    neg_before = neg_excl - neg_excl[run_is_group_start][group_of_run]
    # Integer (doubled) contributions keep the sums exact; halve once at the end.
    contrib2 = run_pos * (2 * neg_before + run_neg)
    n_groups = group_start.size
    num = np.bincount(group_of_run, weights=contrib2, minlength=n_groups) / 2.0

    size = np.diff(np.append(group_start, n))
    n_pos = np.add.reduceat(y_int, group_start)
    n_neg = size - n_pos
    return num, n_pos, n_neg, size


def auc_parts(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[num, n_pos, n_neg]`` of rows sorted by score (``AUC = num / (n_pos * n_neg)``).
    Parts of disjoint score ranges add up, plus ``n_pos`` of a range times ``n_neg`` of the
    ranges below it: what a score-sharded AUC sums."""
    if s.shape[0] == 0:
        return np.zeros(3)
    num, n_pos, n_neg, _ = _sorted_group_auc(s, y, None)
    return np.array([num[0], n_pos[0], n_neg[0]], dtype=np.float64)


def _auc_sorted(s: np.ndarray, y: np.ndarray) -> float:
    num, n_pos, n_neg = auc_parts(s, y)
    return float(num / (n_pos * n_neg)) if n_pos * n_neg > 0 else _NAN


def gauc_parts(
    scores: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    score_order: np.ndarray | None = None,
) -> np.ndarray:
    """``[sum_u n_u * AUC_u, sum_u n_u]`` over the groups having both classes: parts of
    disjoint sets of whole groups add up (what a user-sharded GAUC sums)."""
    if scores.shape[0] == 0:
        return np.zeros(2)
    order = _group_score_order(scores, codes, n_groups, score_order)
    num, n_pos, n_neg, size = _sorted_group_auc(scores[order], y[order], codes[order])
    valid = (n_pos > 0) & (n_neg > 0)
    per_group = num[valid] / (n_pos[valid].astype(np.float64) * n_neg[valid])
    w = size[valid].astype(np.float64)
    return np.array([np.dot(w, per_group), w.sum()])


def _gauc_codes(
    scores: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    score_order: np.ndarray | None = None,
) -> float:
    weighted, weight = gauc_parts(scores, y, codes, n_groups, score_order)
    return float(weighted / weight) if weight > 0 else _NAN


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count 1/2). nan if a class is absent. O(n log n)."""
    s = _as_f64(scores, "scores")
    y = _as_f64(labels, "labels") > 0.5
    _check_same_len(s, y)
    if s.shape[0] == 0 or np.isnan(s).any():
        return _NAN
    order = np.argsort(s)
    return _auc_sorted(s[order], y[order])


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups having both classes.

    Fully vectorised: one sort by (group, score), tie runs via boundary masks and per-group
    sums via bincount/reduceat -- no Python loop over groups. nan if no group qualifies.
    """
    s = _as_f64(scores, "scores")
    y = _as_f64(labels, "labels") > 0.5
    g = np.asarray(groups).reshape(-1)
    _check_same_len(s, y, g)
    if s.shape[0] == 0 or np.isnan(s).any():
        return _NAN
    codes, n_groups = _dense_codes(g)
    return _gauc_codes(s, y, codes, n_groups)


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probs clipped to [eps, 1-eps] so it stays finite."""
    p = _as_f64(probs, "probs")
    y = _as_f64(labels, "labels")
    _check_same_len(p, y)
    return _bce_sum(p, y, eps) / p.shape[0] if p.shape[0] else _NAN


def _bce_sum(p: np.ndarray, y: np.ndarray, eps: float = 1e-7) -> float:
    # Clip in float64: 1 - 1e-7 is not representable distinctly enough in float32.
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.sum(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(probs: np.ndarray, labels: np.ndarray) -> float:
    """mean(prob) / mean(label); nan if empty or the mean label is 0."""
    p = _as_f64(probs, "probs")
    y = _as_f64(labels, "labels")
    _check_same_len(p, y)
    if p.shape[0] == 0:
        return _NAN
    mean_y = float(y.mean())
    return float(p.mean()) / mean_y if mean_y != 0.0 else _NAN


def _binned_inputs(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = _as_f64(probs, "probs")
    y = _as_f64(labels, "labels")
    _check_same_len(p, y)
    return p, y


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1]."""
    p, y = _binned_inputs(probs, labels, bins)
    if p.shape[0] == 0:
        return _NAN
    sum_p, sum_y = _ece_sums(p, y, bins)
    return float(np.abs(sum_p - sum_y).sum() / p.shape[0])


def _ece_sums(p: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """Per-bin sums of probabilities and of labels, ``[2, bins]``.
    n_b/N * |sum_p/n_b - sum_y/n_b| == |sum_p - sum_y| / N: no division by empty bins."""
    # A NaN probability goes to bin 0, where its weight makes the sums (and the ECE) NaN.
    idx = np.nan_to_num(np.clip(np.floor(p * bins), 0, bins - 1)).astype(np.intp)
    return np.stack(
        [np.bincount(idx, weights=p, minlength=bins), np.bincount(idx, weights=y, minlength=bins)]
    )


def reliability(
    probs: np.ndarray, labels: np.ndarray, bins: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram points: ``(rows, mean prob, mean label)`` per bin.

    Bins hold equal numbers of rows (prediction quantiles: row ``i`` of the sorted predictions
    goes to bin ``floor(i * bins / N)``), so a rare task's diagram is not one crowded bin near
    0 as it would be with equal-width bins. Fewer rows than bins give fewer, non-empty bins.
    """
    p, y = _binned_inputs(probs, labels, bins)
    n = p.shape[0]
    if n == 0:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty
    order = np.argsort(p, kind="stable")
    idx = np.arange(n) * min(bins, n) // n
    rows = np.bincount(idx)
    return (
        rows,
        np.bincount(idx, weights=p[order]) / rows,
        np.bincount(idx, weights=y[order]) / rows,
    )


def _nanmean(values: Sequence[float]) -> float:
    # Explicit instead of np.nanmean, which warns on an all-nan slice.
    finite = [v for v in values if not np.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else _NAN


def task_rows(
    probs: np.ndarray, labels: np.ndarray, task: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | slice]:
    """One task's observed rows (NaN label = not observed) as float64: (probs, labels, which).
    Column by column: two whole [N, T] float64 copies would be most of evaluation's memory."""
    # Contiguous copies: strided column views make argsort/reductions much slower.
    y = labels[:, task].astype(np.float64)
    observed = ~np.isnan(y)
    if observed.all():
        return probs[:, task].astype(np.float64), y, slice(None)
    return probs[observed, task].astype(np.float64), y[observed], observed


def additive_sums(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A task's sums over rows that add up across any split of the rows: rows, positives,
    probabilities, cross-entropy, NaN scores, then the ECE bins' sums."""
    head = [p.shape[0], y.sum(), p.sum(), _bce_sum(p, y), np.isnan(p).sum()]
    return np.concatenate([head, _ece_sums(p, y, ECE_BINS).ravel()])


def ranked(p: np.ndarray, y: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """``[*auc_parts, *gauc_parts]`` of a task's rows (scores without NaN)."""
    y_bin = y > 0.5
    order = np.argsort(p)
    return np.concatenate(
        [auc_parts(p[order], y_bin[order]), gauc_parts(p, y_bin, codes, n_groups, order)]
    )


def finish(sums: np.ndarray, auc: np.ndarray, gauc: np.ndarray) -> dict[str, float]:
    """A task's metrics from its ``additive_sums``, ``auc_parts`` and ``gauc_parts``."""
    n, positives, prob_sum, bce_sum, nans = sums[:5]
    ece_p, ece_y = sums[5:].reshape(2, -1)
    can_rank = n > 0 and nans == 0  # NaN scores: no ranking metric rather than a wrong one
    num, n_pos, n_neg = auc
    return {
        "auc": float(num / (n_pos * n_neg)) if can_rank and n_pos * n_neg > 0 else _NAN,
        "gauc": float(gauc[0] / gauc[1]) if can_rank and gauc[1] > 0 else _NAN,
        "logloss": float(bce_sum / n) if n else _NAN,
        "calibration": float((prob_sum / n) / (positives / n)) if n and positives else _NAN,
        "ece": float(np.abs(ece_p - ece_y).sum() / n) if n else _NAN,
        "positive_rate": float(positives / n) if n else _NAN,
        "count": float(n),
    }


def by_task(per_task: Sequence[dict[str, float]], tasks: Sequence[str]) -> dict[str, float]:
    """``"<metric>/<task>"`` keys, plus ``"<metric>/mean"`` (NaN-ignoring) for ``METRICS``."""
    out = {
        f"{m}/{t}": v for t, values in zip(tasks, per_task, strict=True) for m, v in values.items()
    }
    for m in METRICS:
        out[f"{m}/mean"] = _nanmean([values[m] for values in per_task])
    return out


HISTORY_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, None))  # history lengths, inclusive


def metrics_by_history(
    probs: np.ndarray,
    labels: np.ndarray,
    users: np.ndarray,
    lengths: np.ndarray,
    tasks: Sequence[str],
) -> dict[str, dict[str, float]]:
    """``task_metrics`` of the rows in each history-length bucket (0, 1-4, 5-19, 20+): how a
    model does for users with little history. Empty buckets are left out."""
    out = {}
    for low, high in HISTORY_BUCKETS:
        rows = (lengths >= low) & (lengths <= (high if high is not None else np.inf))
        if rows.any():
            name = f"{low}+" if high is None else (f"{low}" if low == high else f"{low}-{high}")
            out[name] = {
                "rows": float(rows.sum()),
                **task_metrics(probs[rows], labels[rows], users[rows], tasks),
            }
    return out


def task_metrics(
    probs: np.ndarray, labels: np.ndarray, users: np.ndarray, tasks: Sequence[str]
) -> dict[str, float]:
    """All ``METRICS`` per task plus their nan-ignoring mean across tasks.

    ``probs``/``labels``: ``[N, T]``; a NaN label = not observed, masked for that task only.
    ``users``: ``[N]`` group ids for GAUC. Keys: ``"<metric>/<task>"`` and ``"<metric>/mean"``
    for each metric in ``METRICS``, plus ``"positive_rate/<task>"`` and ``"count/<task>"``
    (number of observed rows), which are not averaged.
    """
    P, Y = np.asarray(probs), np.asarray(labels)
    u = np.asarray(users).reshape(-1)
    tasks = list(tasks)
    if P.ndim == 1 and len(tasks) == 1:
        P, Y = P[:, None], Y[:, None]
    if P.ndim != 2 or P.shape != Y.shape or P.shape[1] != len(tasks):
        raise ValueError(
            f"probs {P.shape} and labels {Y.shape} must both be [N, {len(tasks)}] (one per task)"
        )
    if u.shape[0] != P.shape[0]:
        raise ValueError(f"users has {u.shape[0]} rows, probs has {P.shape[0]}")

    # Dense user codes once for all tasks; masking keeps codes valid (absent ones are empty).
    codes, n_groups = _dense_codes(u)
    per_task = []
    for t in range(len(tasks)):
        p, y, which = task_rows(P, Y, t)
        sums = additive_sums(p, y)
        parts = ranked(p, y, codes[which], n_groups) if len(p) and not sums[4] else np.zeros(5)
        per_task.append(finish(sums, parts[:3], parts[3:]))
    return by_task(per_task, tasks)
