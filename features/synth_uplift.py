"""Generated uplift data with ground truth: customers, arms, and each customer's true response
to every arm, per task.

One row per customer: numeric features ``x0..x3`` (standard normal), categorical ``region``
(5 values) and ``tier`` (3 values). Arms ``control``, ``arm1``, .. ``arm{A-1}``: drawn uniformly
(randomised) or, with ``logged``, by a softmax over a score of ``x0`` (known propensities,
written as ``propensity``: the probability of the arm received). Two tasks, ``visit`` and
``buy``; per task ``k``, on the logit scale,

    z_k(control) = a_k + u_k . x                           natural response
    z_k(m)       = z_k(control) + tau_k(x) + tau_{k,m}(x)  m >= 1

with a **base effect** of any treatment ``tau_k`` and a smaller **incremental effect** per arm
``tau_{k,m}``, both heterogeneous over the features and different per task:

    tau_visit(x) = 0.8 sigmoid(2 x1),   tau_buy(x) = 0.6 sigmoid(2 x2) [region in {0, 1}]
    tau_{k,m}(x) = s_{k,m} * (x3 > 0 for odd m, tier == m mod 3 for even m)

(``s_{k,m}`` in [0.2, 0.5], a fixed draw). Each row keeps its true probability of every arm and
task, ``p_<task>_<arm>``, so the best achievable Qini (that of the true uplift) can be printed
beside a model's. ``split`` is ``train`` / ``val`` / ``test``, 50 / 25 / 25 at random within
each arm (``split_within``: the Hillstrom benchmarks' rule too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

TASKS = ("visit", "buy")
NATURAL = {"visit": (-1.5, (0.6, 0.3, -0.2, 0.1)), "buy": (-3.0, (0.4, -0.3, 0.2, 0.3))}


def arm_names(treatments: int) -> list[str]:
    return ["control", *(f"arm{m}" for m in range(1, treatments))]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def true_logits(x: np.ndarray, region: np.ndarray, tier: np.ndarray, arms: int, seed: int):
    """Per task, the logits of every arm ``[N, A]``, and the base ``[N]`` and incremental
    ``[N, A-1]`` effects."""
    scales = np.random.default_rng(seed + 1).uniform(0.2, 0.5, (len(TASKS), max(arms - 1, 0)))
    out = {}
    for k, task in enumerate(TASKS):
        bias, weights = NATURAL[task]
        natural = bias + x @ np.asarray(weights)
        if task == "visit":
            base = 0.8 * _sigmoid(2 * x[:, 1])
        else:
            base = 0.6 * _sigmoid(2 * x[:, 2]) * (region < 2)
        incremental = np.stack(
            [
                scales[k, m - 1] * ((x[:, 3] > 0) if m % 2 else (tier == m % 3))
                for m in range(1, arms)
            ],
            1,
        )
        logits = np.concatenate([natural[:, None], (natural + base)[:, None] + incremental], 1)
        out[task] = (logits, base, incremental)
    return out


def generate_uplift(
    rows: int = 100_000, treatments: int = 3, seed: int = 0, logged: bool = False
) -> pl.DataFrame:
    """The generated customers (see the module docstring); ``treatments`` arms, control
    included (at least 2)."""
    if treatments < 2:
        raise ValueError(f"treatments counts the arms with control: at least 2, got {treatments}")
    if rows < 8 * treatments:
        raise ValueError(f"rows must be at least {8 * treatments}, got {rows}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 4))
    region, tier = rng.integers(0, 5, rows), rng.integers(0, 3, rows)
    if logged:  # the first treatment given more to customers with a high x0
        scores = np.zeros((rows, treatments))
        scores[:, 1] = 0.8 * x[:, 0]
        chances = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    else:
        chances = np.full((rows, treatments), 1.0 / treatments)
    arm = (rng.random(rows)[:, None] > np.cumsum(chances, 1)).sum(1).clip(max=treatments - 1)
    names = arm_names(treatments)
    columns: dict[str, object] = {
        "customer": np.arange(rows),
        **{f"x{j}": x[:, j].astype(np.float32) for j in range(4)},
        "region": region,
        "tier": tier,
        "arm": np.asarray(names)[arm],
    }
    if logged:
        columns["propensity"] = chances[np.arange(rows), arm].astype(np.float32)
    for task, (logits, _, _) in true_logits(x, region, tier, treatments, seed).items():
        p = _sigmoid(logits)
        columns[task] = (rng.random(rows) < p[np.arange(rows), arm]).astype(np.int8)
        for m, name in enumerate(names):
            columns[f"p_{task}_{name}"] = p[:, m].astype(np.float32)
    columns["split"] = split_within(arm, (0.5, 0.75), rng)
    return pl.DataFrame(columns)


def split_within(
    groups: np.ndarray, cuts: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """``train`` / ``val`` / ``test`` at random within each group (in order of first
    appearance), cut at the shares ``cuts`` (rounded)."""
    split = np.empty(len(groups), dtype=object)
    for group in dict.fromkeys(groups):
        rows = rng.permutation(np.flatnonzero(groups == group))
        cut = np.round(np.array(cuts) * len(rows)).astype(int)
        split[rows[: cut[0]]], split[rows[cut[0] : cut[1]]] = "train", "val"
        split[rows[cut[1] :]] = "test"
    return split.astype(str)


def true_probabilities(
    frame: pl.DataFrame, arms: list[str], tasks: Sequence[str] = TASKS
) -> np.ndarray:
    """The rows' true probabilities ``[N, A, T]`` (arms and tasks in the order given), from
    the columns ``p_<task>_<arm>``."""
    return np.stack(
        [np.stack([frame[f"p_{task}_{arm}"].to_numpy() for task in tasks], 1) for arm in arms],
        1,
    )


def write_uplift(frame: pl.DataFrame, out: str | Path) -> Path:
    """One Parquet file, ``<out>/customers.parquet``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "customers.parquet"
    frame.write_parquet(path, row_group_size=16_384)
    return path
