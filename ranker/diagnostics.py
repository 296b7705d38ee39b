"""Expert health: the three anomalies HoME (Wang et al., arXiv 2408.05430) names, measured.

HoME reports three ways a multi-gate mixture of experts goes wrong in production:

* **Expert collapse**: an expert's output distribution drifts away from its peers' (ReLU
  experts with more than 90% exact zeros, or outputs on a very different scale), so the gates
  stop weighing the experts fairly and some experts die.
* **Expert degradation**: a *shared* expert ends up used by one task only, i.e. it has
  degenerated into that task's specific expert and shares nothing.
* **Expert underfitting**: a sparse task's gate ignores its own specific experts and takes
  almost everything from the shared ones, so its own experts never learn.

This module measures them on a held-out split from the ``Internals`` a model records
(``MultiTaskModel.forward_with_internals``):

``ExpertStats``
    A streaming accumulator. Per expert (each ``i`` of each pool ``"<layer>/<pool>"``): the
    number of output elements seen, how many are exactly ``0``, and their sum, sum of squares
    and sum of squared deviations (float64, merged across batches with Chan et al.'s pairwise
    update, so the mean and the population std (``ddof=0``) over *all* its output elements are
    exact whatever the batching, and a constant expert has std exactly 0). Per gate
    ``"<layer>/<gate>"``: the sum over rows of its weights ``[E]`` and the row count.

``ExpertStats.update(internals)``
    Called with each batch's internals as the model scores a split (``ranker.scoring.score``
    with ``internals=stats.update``), so metrics and expert health come from one pass.

``health(stats, tasks, ...)`` -> ``HealthReport``, with these definitions:

* collapse (per expert): ``zero_share > limits.zero_share`` (default 0.9), or its std is more
  than ``limits.scale_ratio`` (default 10) times smaller or larger than the median std of the
  experts of its layer (all pools of that layer, itself included; compared only when the layer
  has at least 3 experts and the median is positive); an expert with std 0 (constant output)
  is always collapsed. A gate of 2+ experts whose mean weight on one expert exceeds
  ``limits.gate_pin`` (default 0.9) is collapsed too: it is pinned, its other experts starve.
* gate matrix: ``weights[t, e]`` is task t's mean gate weight on expert e (0 where its gate
  does not see e). Only task gates (``"<layer>/task:<name>"``) count; when a task has task
  gates on several layers (PLE and AdaTT levels) the **last** layer's gate is used: the one
  whose output feeds the task's tower. Tasks without a task gate (Shared-Bottom) have no row.
* degradation (per shared expert, i.e. an expert of a pool named ``"shared"`` that appears in
  a task gate): ``share = max_t w[t, e] / sum_t w[t, e]``; degraded when
  ``share > limits.degradation`` (default 0.8) and at least 2 task gates see the expert.
* underfitting (per task): ``own_mass`` = mean total gate weight on the task's own experts
  (pool ``"task:<name>"`` of its gate's layer; NaN when it has none, e.g. MMoE);
  ``uniform_mass`` = (#own experts) / (#experts its gate sees); underfitting when
  ``own_mass < limits.underfit * uniform_mass`` (default: less than half an even share).
  The task's positive rate, when given, is reported beside it: underfitting is expected to hit
  the sparse tasks.

* routing (top-k gates, ``ranker.experts.Routing``): per gate, each expert's load (the share
  of rows routed to it, i.e. with a non-zero weight) and the balance term ``sum_i f_i P_i``
  averaged over batches (what the balance loss reads, before ``alpha``; 1 = an even load); an
  expert that no top-k gate routes any row to is flagged (idle).

Everything is vectorised per pool / gate; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ranker.experts import Internals

__all__ = [
    "ExpertRow",
    "ExpertStats",
    "GateRow",
    "HealthLimits",
    "HealthReport",
    "SharedExpertRow",
    "TaskRow",
    "health",
    "json_safe",
]

_NAN = float("nan")


def _reduce_device(x: torch.Tensor) -> torch.Tensor:
    """Detached float64 view of ``x`` on a device that has float64 (MPS has not: CPU)."""
    x = x.detach()
    if x.device.type == "mps":
        x = x.cpu()
    return x.to(torch.float64)


class ExpertStats:
    """Streaming per-expert and per-gate statistics over batches; see the module docstring.

    Per pool ``"<layer>/<pool>"`` (arrays of length n, the pool's experts): ``count``
    (elements), ``zeros`` (elements exactly 0), ``sum``, ``sum_sq`` and ``m2`` (sum of squared
    deviations from the mean, the stable way to the std). Per gate ``"<layer>/<gate>"``:
    ``gate_experts`` (expert names), ``gate_sum`` ``[E]`` and ``gate_rows``.

    With ``sample_rows > 0`` it also keeps, per pool, the outputs of a uniform random sample
    of ``sample_rows`` rows (``samples[pool]``, float32 ``[k, n, D]``; reservoir sampling by
    random keys, so the sample does not depend on how rows were batched): the distribution
    plots of the evaluation report are drawn from it.
    """

    def __init__(self, sample_rows: int = 0, seed: int = 0) -> None:
        self.count: dict[str, np.ndarray] = {}
        self.zeros: dict[str, np.ndarray] = {}
        self.sum: dict[str, np.ndarray] = {}
        self.sum_sq: dict[str, np.ndarray] = {}
        self.m2: dict[str, np.ndarray] = {}
        self.gate_experts: dict[str, list[str]] = {}
        self.gate_sum: dict[str, np.ndarray] = {}
        self.gate_rows: dict[str, int] = {}
        self.gate_routed: dict[str, np.ndarray] = {}  # top-k gates: rows routed per expert
        self.balance_sum: dict[str, float] = {}  # top-k gates: sum over batches of f . P
        self.balance_batches: dict[str, int] = {}
        self.batches = 0
        self.sample_rows = sample_rows
        self.samples: dict[str, np.ndarray] = {}
        self._sample_keys: dict[str, np.ndarray] = {}
        self._rng = np.random.default_rng(seed)

    def _sample(self, key: str, out: torch.Tensor) -> None:
        """Keep the rows with the ``sample_rows`` smallest random keys seen so far."""
        keys = self._rng.random(out.shape[0])
        # Only the batch's own k smallest keys can enter: copy just those rows off the device.
        take = np.argsort(keys)[: self.sample_rows]
        rows = out[torch.from_numpy(take).to(out.device)].detach().float().cpu().numpy()
        keys = np.concatenate([self._sample_keys.get(key, np.zeros(0)), keys[take]])
        if key in self.samples:
            rows = np.concatenate([self.samples[key], rows])
        keep = np.argsort(keys)[: self.sample_rows]
        self._sample_keys[key], self.samples[key] = keys[keep], rows[keep]

    def update(self, internals: Internals) -> None:
        """Add one batch's expert outputs and gate weights."""
        for key, out in internals.experts.items():
            if out.dim() != 3:
                raise ValueError(f"expert output {key!r} must be [B, n, D], got {tuple(out.shape)}")
            x = _reduce_device(out)
            b, n, d = x.shape
            cnt = b * d
            total = x.sum(dim=(0, 2))
            mean_b = total / cnt if cnt else torch.zeros_like(total)
            m2_b = (x - mean_b[None, :, None]).square().sum(dim=(0, 2))
            zeros = (x == 0).sum(dim=(0, 2))
            sum_sq = x.square().sum(dim=(0, 2))
            total, m2_b, sum_sq = (t.cpu().numpy() for t in (total, m2_b, sum_sq))
            zeros = zeros.cpu().numpy().astype(np.int64)
            if key not in self.count:
                self.count[key] = np.zeros(n, dtype=np.int64)
                self.zeros[key] = np.zeros(n, dtype=np.int64)
                self.sum[key] = np.zeros(n)
                self.sum_sq[key] = np.zeros(n)
                self.m2[key] = np.zeros(n)
            elif self.count[key].shape[0] != n:
                raise ValueError(f"pool {key!r} had {self.count[key].shape[0]} experts, now {n}")
            if cnt == 0:
                continue
            if self.sample_rows:
                self._sample(key, out)
            # Chan et al.: merge (n_a, mean_a, M2_a) with the batch's (n_b, mean_b, M2_b).
            n_a = self.count[key].astype(np.float64)
            mean_a = np.divide(self.sum[key], n_a, out=np.zeros(n), where=n_a > 0)
            delta = total / cnt - mean_a
            self.m2[key] += m2_b + delta**2 * n_a * cnt / (n_a + cnt)
            self.count[key] += cnt
            self.zeros[key] += zeros
            self.sum[key] += total
            self.sum_sq[key] += sum_sq
        for key, (names, weights) in internals.gates.items():
            w = _reduce_device(weights).sum(dim=0).cpu().numpy()
            if key not in self.gate_sum:
                self.gate_experts[key] = list(names)
                self.gate_sum[key] = np.zeros(len(names))
                self.gate_rows[key] = 0
            elif self.gate_experts[key] != list(names):
                raise ValueError(f"gate {key!r} changed its experts between batches")
            self.gate_sum[key] += w
            self.gate_rows[key] += int(weights.shape[0])
            if key in internals.balance:
                routed = (weights > 0).sum(dim=0).cpu().numpy().astype(np.int64)
                self.gate_routed[key] = self.gate_routed.get(key, 0) + routed
                self.balance_sum[key] = self.balance_sum.get(key, 0.0) + float(
                    internals.balance[key]
                )
                self.balance_batches[key] = self.balance_batches.get(key, 0) + 1
        self.batches += 1

    @property
    def pools(self) -> list[str]:
        return list(self.count)

    @property
    def gates(self) -> list[str]:
        return list(self.gate_sum)

    def expert_names(self, pool: str) -> list[str]:
        return [f"{pool}/{i}" for i in range(self.count[pool].shape[0])]

    def zero_share(self, pool: str) -> np.ndarray:
        c = self.count[pool].astype(np.float64)
        return np.divide(self.zeros[pool], c, out=np.full(c.shape, _NAN), where=c > 0)

    def mean(self, pool: str) -> np.ndarray:
        c = self.count[pool].astype(np.float64)
        return np.divide(self.sum[pool], c, out=np.full(c.shape, _NAN), where=c > 0)

    def std(self, pool: str) -> np.ndarray:
        """Population std (``ddof=0``) over all output elements of each expert."""
        c = self.count[pool].astype(np.float64)
        var = np.divide(self.m2[pool], c, out=np.full(c.shape, _NAN), where=c > 0)
        return np.sqrt(np.maximum(var, 0.0))

    def load(self, gate: str) -> np.ndarray | None:
        """A top-k gate's share of rows routed to each expert ``[E]`` (None: a dense gate)."""
        if gate not in self.gate_routed or not self.gate_rows[gate]:
            return None
        return self.gate_routed[gate] / self.gate_rows[gate]

    def balance(self, gate: str) -> float:
        """A top-k gate's ``sum_i f_i P_i``, averaged over batches (NaN: a dense gate)."""
        batches = self.balance_batches.get(gate, 0)
        return self.balance_sum[gate] / batches if batches else _NAN

    def gate_mean(self, gate: str) -> np.ndarray:
        """Mean weight per expert of the gate, ``[E]`` (rows sum to 1, so this does too)."""
        rows = self.gate_rows[gate]
        return self.gate_sum[gate] / rows if rows else np.full(len(self.gate_sum[gate]), _NAN)


@dataclass
class ExpertRow:
    name: str  # "<layer>/<pool>/<i>"
    layer: str
    pool: str
    zero_share: float
    mean: float
    std: float
    collapsed: bool
    reason: str  # why it is collapsed; "" when it is not


@dataclass
class SharedExpertRow:
    name: str
    top_task: str  # the task that takes the largest part of its task-gate weight
    share: float  # max_t w[t, e] / sum_t w[t, e]
    tasks_seen: int  # how many task gates see it
    degraded: bool


@dataclass
class TaskRow:
    name: str
    gate: str | None  # the task gate used ("<layer>/task:<name>"); None if it has none
    own_experts: int
    seen_experts: int
    own_mass: float  # mean gate weight on its own experts; NaN without own experts
    uniform_mass: float  # own_experts / seen_experts
    positive_rate: float
    underfitting: bool


@dataclass(frozen=True)
class HealthLimits:
    """Where an expert, gate or task is flagged (see the module docstring)."""

    zero_share: float = 0.9  # collapse: share of exact-zero activations above this
    scale_ratio: float = 10.0  # collapse: std this many times off its layer's median
    gate_pin: float = 0.9  # collapse: a gate's mean weight on one expert above this
    degradation: float = 0.8  # a shared expert's largest task taking more than this
    underfit: float = 0.5  # own-expert gate mass below this fraction of an even share


@dataclass
class GateRow:
    name: str  # "<layer>/<gate>"
    experts: int
    top_expert: str
    top_weight: float  # mean weight on its most used expert
    pinned: bool  # top_weight > limits.gate_pin: the other experts are starved
    load: list[float] | None = None  # top-k gates: share of rows routed to each expert
    balance: float = _NAN  # top-k gates: sum_i f_i P_i, mean over batches (1 = even)
    idle: int = 0  # top-k gates: experts it routed no row to


@dataclass
class HealthReport:
    experts: list[ExpertRow]
    gate_matrix: dict[str, Any]  # tasks, experts, weights [T, E], seen [T, E]
    shared_experts: list[SharedExpertRow]
    tasks: list[TaskRow]
    flags: list[str] = field(default_factory=list)
    gates: list[GateRow] = field(default_factory=list)

    @property
    def collapsed(self) -> list[str]:
        """Collapsed experts, and gates pinned to one expert."""
        return [r.name for r in self.experts if r.collapsed] + [
            r.name for r in self.gates if r.pinned
        ]

    @property
    def degraded(self) -> list[str]:
        return [r.name for r in self.shared_experts if r.degraded]

    @property
    def underfitting(self) -> list[str]:
        return [r.name for r in self.tasks if r.underfitting]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: lists and plain numbers, NaN as ``None``."""
        gm = self.gate_matrix
        return json_safe(
            {
                "experts": [asdict(r) for r in self.experts],
                "gates": [asdict(r) for r in self.gates],
                "gate_matrix": {
                    "tasks": list(gm["tasks"]),
                    "experts": list(gm["experts"]),
                    "weights": np.asarray(gm["weights"]).tolist(),
                    "seen": np.asarray(gm["seen"]).tolist(),
                },
                "shared_experts": [asdict(r) for r in self.shared_experts],
                "tasks": [asdict(r) for r in self.tasks],
                "flags": list(self.flags),
            }
        )


def json_safe(obj: Any) -> Any:
    """Dicts, lists and plain numbers for JSON: numpy scalars unwrapped, NaN / inf as None."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _expert_rows(
    stats: ExpertStats, zero_share_limit: float, scale_ratio_limit: float
) -> list[ExpertRow]:
    rows: list[ExpertRow] = []
    by_layer: dict[str, list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for key in stats.pools:
        layer, _, pool = key.partition("/")
        by_layer.setdefault(layer, []).append(
            (key, pool, stats.zero_share(key), stats.mean(key), stats.std(key))
        )
    for layer, pools in by_layer.items():
        stds = np.concatenate([p[4] for p in pools])
        median = float(np.median(stds)) if stds.size >= 3 else _NAN
        compare = stds.size >= 3 and median > 0
        for key, pool, zero, mean, std in pools:
            for i, name in enumerate(stats.expert_names(key)):
                z, m, s = float(zero[i]), float(mean[i]), float(std[i])
                reasons = []
                if z > zero_share_limit:
                    reasons.append(f"{_pct(z)} zero activations")
                if s == 0:
                    reasons.append("constant output (std 0)")
                elif compare and s * scale_ratio_limit < median:
                    reasons.append(
                        f"std {median / s:.1f}x smaller than its layer's median {median:.3g}"
                    )
                elif compare and s > scale_ratio_limit * median:
                    reasons.append(
                        f"std {s / median:.1f}x larger than its layer's median {median:.3g}"
                    )
                reason = "; ".join(reasons)
                rows.append(ExpertRow(name, layer, pool, z, m, s, bool(reasons), reason))
    return rows


def _idle_experts(stats: ExpertStats) -> list[str]:
    """Flags for experts that top-k gates see but route no row to (dense gates: none)."""
    routed: dict[str, int] = {}
    for gate, counts in stats.gate_routed.items():
        for name, count in zip(stats.gate_experts[gate], counts, strict=True):
            routed[name] = routed.get(name, 0) + int(count)
    return [
        f"routing: expert {name} receives no rows (no top-k gate routes to it)"
        for name, count in routed.items()
        if count == 0
    ]


def _task_gates(stats: ExpertStats, tasks: Sequence[str]) -> dict[str, str]:
    """Task name -> its last task gate ``"<layer>/task:<name>"`` (the one feeding its tower)."""
    chosen: dict[str, str] = {}
    for gate in stats.gates:  # insertion order = forward order, so the last layer wins
        _, _, name = gate.partition("/")
        if name.startswith("task:") and name[len("task:") :] in tasks:
            chosen[name[len("task:") :]] = gate
    return {t: chosen[t] for t in tasks if t in chosen}


def health(
    stats: ExpertStats,
    tasks: Sequence[str],
    positive_rates: Mapping[str, float] | None = None,
    limits: HealthLimits = HealthLimits(),
) -> HealthReport:
    """Collapse, degradation and underfitting from ``stats``; see the module docstring.

    ``tasks`` are task names (objects with a ``name``, e.g. ``TaskSpec``, are accepted too);
    ``positive_rates`` maps task names to their positive rate, reported beside underfitting.
    """
    task_names = [getattr(t, "name", t) for t in tasks]
    rates = dict(positive_rates or {})
    flags: list[str] = []

    experts = _expert_rows(stats, limits.zero_share, limits.scale_ratio)
    for r in experts:
        if r.collapsed:
            flags.append(f"collapse: {r.name} has {r.reason} (mean {r.mean:.3g}, std {r.std:.3g})")
    gates = []
    for gate in stats.gates:
        mean = stats.gate_mean(gate)
        top = int(np.argmax(mean))
        pinned = bool(mean.size >= 2 and mean[top] > limits.gate_pin)
        load = stats.load(gate)
        gates.append(
            GateRow(
                gate,
                int(mean.size),
                stats.gate_experts[gate][top],
                float(mean[top]),
                pinned,
                None if load is None else load.tolist(),
                stats.balance(gate),
                0 if load is None else int((load == 0).sum()),
            )
        )
        if pinned:
            flags.append(
                f"collapse: gate {gate} puts {_pct(mean[top])} of its weight on "
                f"{stats.gate_experts[gate][top]} (of {mean.size} experts)"
            )

    flags += _idle_experts(stats)

    # Gate matrix over each task's last task gate.
    gate_of = _task_gates(stats, task_names)
    matrix_tasks = list(gate_of)
    columns: dict[str, int] = {}
    for gate in gate_of.values():
        for name in stats.gate_experts[gate]:
            columns.setdefault(name, len(columns))
    weights = np.zeros((len(matrix_tasks), len(columns)))
    seen = np.zeros((len(matrix_tasks), len(columns)), dtype=bool)
    for t, task in enumerate(matrix_tasks):
        gate = gate_of[task]
        idx = np.array([columns[n] for n in stats.gate_experts[gate]], dtype=np.int64)
        weights[t, idx] = stats.gate_mean(gate)
        seen[t, idx] = True

    # Columns grouped as the models are drawn: shared, then group pools, then task pools.
    def column_order(name: str) -> tuple[int, int, int]:
        pool = name.rsplit("/", 1)[0].partition("/")[2]
        kind = 0 if pool == "shared" else 1 if pool.startswith("group:") else 2
        task = task_names.index(pool[5:]) if pool[5:] in task_names else len(task_names)
        return kind, task if kind == 2 else 0, columns[name]

    expert_names = sorted(columns, key=column_order)
    order = np.array([columns[n] for n in expert_names], dtype=np.int64)
    weights, seen = weights[:, order], seen[:, order]
    gate_matrix = {
        "tasks": matrix_tasks,
        "experts": expert_names,
        "weights": weights,
        "seen": seen,
    }

    # Degradation: shared experts taken over by one task.
    shared: list[SharedExpertRow] = []
    if matrix_tasks:
        totals = weights.sum(axis=0)
        top = weights.argmax(axis=0)
        shares = np.divide(
            weights.max(axis=0), totals, out=np.full(totals.shape, _NAN), where=totals > 0
        )
        n_seen = seen.sum(axis=0)
        for e, name in enumerate(expert_names):
            if name.rsplit("/", 1)[0].partition("/")[2] != "shared":
                continue
            share, count = float(shares[e]), int(n_seen[e])
            degraded = bool(count >= 2 and share > limits.degradation)
            row = SharedExpertRow(name, matrix_tasks[top[e]], share, count, degraded)
            shared.append(row)
            if degraded:
                flags.append(
                    f"degradation: shared expert {name} is {_pct(share)} used by "
                    f"'{row.top_task}' (of its gate weight over {count} tasks)"
                )

    # Underfitting: a task's gate ignoring its own experts.
    rows: list[TaskRow] = []
    for task in task_names:
        rate = float(rates.get(task, _NAN))
        gate = gate_of.get(task)
        if gate is None:
            rows.append(TaskRow(task, None, 0, 0, _NAN, _NAN, rate, False))
            continue
        layer = gate.partition("/")[0]
        names = stats.gate_experts[gate]
        own = np.array([n.rsplit("/", 1)[0] == f"{layer}/task:{task}" for n in names])
        n_own = int(own.sum())
        own_mass = float(stats.gate_mean(gate)[own].sum()) if n_own else _NAN
        uniform = n_own / len(names) if names else _NAN
        under = bool(n_own and own_mass < limits.underfit * uniform)
        rows.append(TaskRow(task, gate, n_own, len(names), own_mass, uniform, rate, under))
        if under:
            shown = "n/a" if math.isnan(rate) else f"{rate:.3g}"
            flags.append(
                f"underfitting: '{task}' (positive rate {shown}) puts {_pct(own_mass)} of its "
                f"gate weight on its own experts (even share {_pct(uniform)})"
            )

    return HealthReport(experts, gate_matrix, shared, rows, flags, gates)
