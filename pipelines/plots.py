"""The figures of the evaluation and comparison reports (matplotlib, drawn off-screen).

Every function takes the report's plain data and returns a ``data:image/png;base64`` URI, so
the HTML report is one self-contained file. Collapsed experts are drawn in red everywhere.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

HEALTHY, FLAGGED, LIMIT = "#4c72b0", "#d62728", "#555555"


def data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(n: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def reliability(curves: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping) -> str:
    """One diagram per task: mean prediction vs observed rate per equal-mass bin."""
    fig, axes = _grid(len(curves), 4, (3.4, 3.2))
    for ax, (task, curve) in zip(axes.flat, curves.items(), strict=False):
        pred, rate = np.asarray(curve["pred"]), np.asarray(curve["rate"])
        top = max(float(pred.max(initial=0)), float(rate.max(initial=0)), 1e-6) * 1.05
        ax.plot([0, top], [0, top], color=LIMIT, linewidth=0.8, linestyle="--")
        ax.plot(pred, rate, marker="o", markersize=3.5, color=HEALTHY)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ece, calib = metrics.get(f"ece/{task}", math.nan), metrics.get(f"calibration/{task}")
        ax.set_title(f"{task}\nECE {ece:.4f} · calib {calib:.3f}", fontsize=9)
        ax.set_xlabel("mean prediction", fontsize=8)
        ax.set_ylabel("observed rate", fontsize=8)
        ax.tick_params(labelsize=7)
    return data_uri(fig)


def _expert_colors(experts: Sequence[Mapping[str, Any]]) -> list[str]:
    return [FLAGGED if e["collapsed"] else HEALTHY for e in experts]


def expert_health(experts: Sequence[Mapping[str, Any]], zero_share_limit: float) -> str:
    """Per expert: share of exact-zero activations (limit dashed) and output std (log)."""
    names = [e["name"] for e in experts]
    x = np.arange(len(names))
    colors = _expert_colors(experts)
    fig, (zero_ax, std_ax) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.32 * len(names) + 2), 5.6), sharex=True, layout="constrained"
    )
    zero_ax.bar(x, [e["zero_share"] or 0.0 for e in experts], color=colors)
    zero_ax.axhline(zero_share_limit, color=LIMIT, linestyle="--", linewidth=0.8)
    zero_ax.set_ylim(0, 1)
    zero_ax.set_ylabel("zero-activation share")
    std = np.array([e["std"] or 0.0 for e in experts])
    std_ax.bar(x, np.maximum(std, 1e-12), color=colors)
    std_ax.errorbar(
        x, [e["mean"] or 0.0 for e in experts], fmt="_", color="black", markersize=8, label="mean"
    )
    std_ax.set_yscale("symlog", linthresh=1e-3)
    std_ax.set_ylabel("output std (bars), mean (-)")
    std_ax.legend(fontsize=8, loc="upper right")
    std_ax.set_xticks(x, names, rotation=90, fontsize=7)
    return data_uri(fig)


def distributions(samples: Mapping[str, np.ndarray], experts: Sequence[Mapping[str, Any]]) -> str:
    """Box plot (1st-99th percentile whiskers) of each expert's sampled output values."""
    collapsed = {e["name"] for e in experts if e["collapsed"]}
    names, values = [], []
    for pool, sample in samples.items():  # [k, n, D]
        for i in range(sample.shape[1]):
            names.append(f"{pool}/{i}")
            values.append(sample[:, i, :].reshape(-1))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6), layout="constrained")
    boxes = ax.boxplot(values, whis=(1, 99), showfliers=False, patch_artist=True)
    for patch, name in zip(boxes["boxes"], names, strict=True):
        patch.set_facecolor(FLAGGED if name in collapsed else HEALTHY)
        patch.set_alpha(0.7)
    ax.axhline(0, color=LIMIT, linewidth=0.6)
    ax.set_xticks(np.arange(1, len(names) + 1), names, rotation=90, fontsize=7)
    ax.set_ylabel("expert output value")
    return data_uri(fig)


def gate_heatmap(gate_matrix: Mapping[str, Any]) -> str:
    """Task x expert mean gate weights; experts a task's gate cannot see are blank."""
    weights = np.asarray(gate_matrix["weights"], dtype=float)
    seen = np.asarray(gate_matrix["seen"], dtype=bool)
    tasks, experts = gate_matrix["tasks"], gate_matrix["experts"]
    fig, ax = plt.subplots(
        figsize=(max(5.0, 0.42 * len(experts) + 2.5), 0.42 * len(tasks) + 1.8),
        layout="constrained",
    )
    image = ax.imshow(np.ma.masked_where(~seen, weights), cmap="viridis", vmin=0, aspect="auto")
    if weights.size <= 400:  # numbers stay legible
        for t, e in zip(*np.nonzero(seen), strict=True):
            value = weights[t, e]
            color = "white" if value < 0.6 * weights.max() else "black"
            ax.text(e, t, f"{value:.2f}", ha="center", va="center", fontsize=6.5, color=color)
    ax.set_xticks(np.arange(len(experts)), experts, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(tasks)), tasks, fontsize=8)
    fig.colorbar(image, ax=ax, label="mean gate weight")
    return data_uri(fig)


def gate_usage(
    tasks: Sequence[Mapping[str, Any]],
    shared: Sequence[Mapping[str, Any]],
    degradation_limit: float,
) -> str | None:
    """Own-expert gate mass per task beside an even share; largest-task share per shared expert."""
    own = [t for t in tasks if t["own_mass"] is not None]
    panels = [p for p in (own, shared) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False, layout="constrained"
    )
    ax_iter = iter(axes.flat)
    if own:
        ax = next(ax_iter)
        x = np.arange(len(own))
        ax.bar(x - 0.2, [t["own_mass"] for t in own], 0.4, label="own experts", color=HEALTHY)
        ax.bar(x + 0.2, [t["uniform_mass"] for t in own], 0.4, label="even share", color="#bbbbbb")
        labels = [
            f"{t['name']}\n{t['positive_rate']:.3g}"
            if t["positive_rate"] is not None
            else t["name"]
            for t in own
        ]
        ax.set_xticks(x, labels, fontsize=7, rotation=45)
        ax.set_ylabel("gate mass (task, positive rate)")
        ax.legend(fontsize=8)
        for i, t in enumerate(own):
            if t["underfitting"]:
                ax.text(i - 0.2, t["own_mass"], "!", color=FLAGGED, ha="center", va="bottom")
    if shared:
        ax = next(ax_iter)
        x = np.arange(len(shared))
        colors = [FLAGGED if s["degraded"] else HEALTHY for s in shared]
        ax.bar(x, [s["share"] or 0.0 for s in shared], color=colors)
        ax.axhline(degradation_limit, color=LIMIT, linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_xticks(
            x, [f"{s['name']}\n({s['top_task']})" for s in shared], fontsize=7, rotation=45
        )
        ax.set_ylabel("share of its largest task")
    return data_uri(fig)


def compare_bars(
    labels: Sequence[str], tasks: Sequence[str], values: Mapping[str, np.ndarray]
) -> str:
    """Grouped bars per task, one bar per run, one panel per metric (``values[metric]`` [R, T])."""
    fig, axes = plt.subplots(
        len(values),
        1,
        figsize=(max(6.0, 0.9 * len(tasks) * max(1, len(labels) / 2) + 2), 3.2 * len(values)),
        squeeze=False,
        layout="constrained",
    )
    x = np.arange(len(tasks))
    width = 0.8 / len(labels)
    for ax, (metric, grid) in zip(axes.flat, values.items(), strict=True):
        for r, label in enumerate(labels):
            ax.bar(x + (r - (len(labels) - 1) / 2) * width, grid[r], width, label=label)
        finite = grid[np.isfinite(grid)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            pad = max(0.01, 0.1 * (high - low))
            ax.set_ylim(max(0.0, low - pad), high + pad)
        ax.set_xticks(x, tasks, fontsize=8)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7, loc="upper left")
    return data_uri(fig)


def qini(
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], metrics: Mapping
) -> str:
    """One Qini plot per task and arm: incremental responders against the share of customers
    targeted in the model's order and in a random one (a straight line). The ideal order the
    Qini is normalised by (every treated responder first) rises far above both and would
    flatten them: it is in the data (``perfect``), not drawn."""
    panels = [(task, arm, c) for task, by_arm in curves.items() for arm, c in by_arm.items()]
    fig, axes = _grid(len(panels), 4, (3.4, 3.2))
    for ax, (task, arm, c) in zip(axes.flat, panels, strict=False):
        share, model = np.asarray(c["share"]), np.asarray(c["model"])
        ax.plot([0, 1], [0, model[-1]], color=LIMIT, linewidth=0.8, linestyle="--", label="random")
        ax.plot(share, model, color=HEALTHY, label="model")
        value = metrics.get(f"qini/{task}/{arm}", math.nan)
        ax.set_title(f"{task}: {arm}\nQini {value:.4f}", fontsize=9)
        ax.set_xlabel("share targeted", fontsize=8)
        ax.set_ylabel("incremental responders", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
    return data_uri(fig)
