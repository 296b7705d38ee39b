"""Evaluation and comparison reports as HTML (Jinja templates, plots embedded), markdown and
terminal tables. Every table is built once (``Table``) and rendered three ways."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from rich.console import Console
from rich.table import Table as RichTable

from pipelines import plots
from pipelines.evaluation import RELIABILITY_BINS, SAMPLE_ROWS, Evaluation

TEMPLATES = Environment(loader=PackageLoader("pipelines"), autoescape=select_autoescape())

# (metric, title, better): better = "high", "low" or "one" (closest to 1)
METRIC_COLUMNS = (
    ("auc", "AUC", "high"),
    ("gauc", "GAUC", "high"),
    ("logloss", "logloss", "low"),
    ("calibration", "calibration", "one"),
    ("ece", "ECE", "low"),
)


def wide_console() -> Console:
    # Tables of per-task metrics are wide; a pipe or CI log would otherwise get 80 columns.
    return Console(width=max(Console().width, 140))


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    classes: list[list[str]] = field(default_factory=list)  # CSS class per cell (HTML only)

    def add(self, cells: Sequence[str], classes: Sequence[str] | None = None) -> None:
        self.rows.append(list(cells))
        self.classes.append(list(classes) if classes else [""] * len(cells))

    def html(self) -> Markup:
        head = "".join(f"<th>{escape(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="{c}">{escape(v)}</td>' if c else f"<td>{escape(v)}</td>"
                for v, c in zip(row, classes, strict=True)
            )
            + "</tr>"
            for row, classes in zip(self.rows, self.classes, strict=True)
        )
        return Markup(f"<table><tr>{head}</tr>{body}</table>")

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += [
            "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in self.rows
        ]
        return "\n".join(lines)

    def rich(self, title: str | None = None) -> RichTable:
        table = RichTable(title=title)
        for i, header in enumerate(self.headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row, classes in zip(self.rows, self.classes, strict=True):
            table.add_row(*(_rich_cell(v, c) for v, c in zip(row, classes, strict=True)))
        return table


def _rich_cell(value: str, css: str) -> str:
    style = {"better": "green", "worse": "red", "flagged": "bold red"}.get(css)
    return f"[{style}]{value}[/{style}]" if style else value


# -- one evaluation -----------------------------------------------------------------------------


def metrics_table(e: Evaluation) -> Table:
    oracle = e.oracle or {}
    headers = ["task", "group", "rows", "pos. rate", "AUC"]
    headers += ["best AUC"] if oracle else []
    headers += ["GAUC"] + (["best GAUC"] if oracle else [])
    headers += ["logloss", "calibration", "ECE"]
    raw = e.uncalibrated or {}
    headers += ["calibration before", "ECE before"] if raw else []
    table = Table(headers)
    for task in [*e.tasks, "mean"]:
        count = e.metrics.get(f"count/{task}")
        cells = [
            task,
            e.groups.get(task, ""),
            fmt(int(count)) if count is not None and not math.isnan(count) else "",
            fmt(e.metrics.get(f"positive_rate/{task}")) if task != "mean" else "",
            fmt(e.value("auc", task)),
        ]
        cells += [fmt(oracle.get(f"auc/{task}"))] if oracle else []
        cells += [fmt(e.value("gauc", task))]
        cells += [fmt(oracle.get(f"gauc/{task}"))] if oracle else []
        cells += [fmt(e.value(m, task)) for m in ("logloss", "calibration", "ece")]
        cells += [fmt(raw.get(f"{m}/{task}")) for m in ("calibration", "ece")] if raw else []
        table.add(cells)
    return table


def history_table(e: Evaluation) -> Table | None:
    """Mean AUC / GAUC and each task's AUC by history length (``ranker evaluate``)."""
    if not e.by_history:
        return None
    table = Table(["history length", "rows", "AUC", "GAUC", *(f"AUC {t}" for t in e.tasks)])
    for bucket, m in e.by_history.items():
        cells = [bucket, fmt(int(m["rows"])), fmt(m.get("auc/mean")), fmt(m.get("gauc/mean"))]
        table.add(cells + [fmt(m.get(f"auc/{t}")) for t in e.tasks])
    return table


UPLIFT_COLUMNS = (("qini", "Qini"), ("auuc", "AUUC"), ("uplift_at_10", "uplift@10%"))
UPLIFT_COLUMNS += (("uplift_at_30", "uplift@30%"),)


def uplift_table(e: Evaluation) -> Table | None:
    """Per task and arm against control: the uplift metrics; where the log has the true
    effects, the model's error against them (PEHE, correlation) and their Qini (the best
    achievable)."""
    if not e.uplift or not e.arms:
        return None
    oracle = e.uplift_oracle or {}
    columns = list(UPLIFT_COLUMNS)
    if "pehe/mean" in e.uplift:  # known true effects, rows aligned
        columns += [("pehe", "PEHE"), ("effect_corr", "corr. true effect")]
    headers = ["task", "arm", *(title for _, title in columns)]
    table = Table(headers + (["best Qini"] if oracle else []))
    pairs = [(t, a) for t in e.tasks for a in e.arms[1:]] + [("mean", "")]
    for task, arm in pairs:
        key = f"{task}/{arm}" if arm else task
        cells = [task, arm, *(fmt(e.uplift.get(f"{m}/{key}")) for m, _ in columns)]
        table.add(cells + ([fmt(oracle.get(f"qini/{key}"))] if oracle else []))
    return table


def experts_table(health: dict[str, Any]) -> Table:
    table = Table(["expert", "zero share", "mean", "std", "collapsed"])
    for r in health["experts"]:
        css = "flagged" if r["collapsed"] else ""
        table.add(
            [r["name"], fmt(r["zero_share"], 3), fmt(r["mean"], 4), fmt(r["std"], 4), r["reason"]],
            [css, css, "", "", css],
        )
    return table


def gates_table(health: dict[str, Any]) -> Table:
    """Every gate; top-k gates also with their expert load and balance term."""
    routed = any(r.get("load") is not None for r in health["gates"])
    extra = ["load min / max", "balance (1 = even)", "idle experts"] if routed else []
    table = Table(["gate", "experts", "most used expert", "its mean weight", "pinned", *extra])
    for r in health["gates"]:
        css = "flagged" if r["pinned"] else ""
        cells = [r["name"], str(r["experts"]), r["top_expert"], fmt(r["top_weight"], 3)]
        cells.append(fmt(r["pinned"]))
        styles = [css, "", "", css, css]
        if routed:
            load = r.get("load")
            shown = f"{fmt(min(load), 3)} / {fmt(max(load), 3)}" if load else ""
            idle = r.get("idle", 0)
            cells += [shown, fmt(r.get("balance"), 3), str(idle) if load else ""]
            styles += ["", "", "flagged" if idle else ""]
        table.add(cells, styles)
    return table


def shared_table(health: dict[str, Any]) -> Table:
    table = Table(["shared expert", "largest task", "its share", "task gates", "degraded"])
    for r in health["shared_experts"]:
        css = "flagged" if r["degraded"] else ""
        table.add(
            [
                r["name"],
                r["top_task"],
                fmt(r["share"], 3),
                str(r["tasks_seen"]),
                fmt(r["degraded"]),
            ],
            [css, "", css, "", css],
        )
    return table


def tasks_table(health: dict[str, Any]) -> Table:
    table = Table(["task", "pos. rate", "own experts", "own mass", "even share", "underfitting"])
    for r in health["tasks"]:
        css = "flagged" if r["underfitting"] else ""
        table.add(
            [
                r["name"],
                fmt(r["positive_rate"]),
                f"{r['own_experts']} of {r['seen_experts']}",
                fmt(r["own_mass"], 3),
                fmt(r["uniform_mass"], 3),
                fmt(r["underfitting"]),
            ],
            [css, "", "", css, "", css],
        )
    return table


def evaluation_images(e: Evaluation, samples: dict[str, np.ndarray]) -> dict[str, str | None]:
    h = e.health
    images: dict[str, str | None] = {"reliability": plots.reliability(e.reliability, e.metrics)}
    if e.qini_curves:
        images["qini"] = plots.qini(e.qini_curves, e.uplift or {})
    if h["experts"]:
        images["expert_health"] = plots.expert_health(h["experts"], e.limits["zero_share"])
        images["distributions"] = plots.distributions(samples, h["experts"]) if samples else None
    if h["gate_matrix"]["tasks"]:
        images["gate_heatmap"] = plots.gate_heatmap(h["gate_matrix"])
        images["gate_usage"] = plots.gate_usage(
            h["tasks"], h["shared_experts"], e.limits["degradation"]
        )
    return images


def evaluation_html(e: Evaluation, samples: dict[str, np.ndarray]) -> str:
    return TEMPLATES.get_template("evaluation.html.j2").render(
        e=e,
        health=e.health,
        images=evaluation_images(e, samples),
        metrics_table=metrics_table(e).html(),
        history_table=history.html() if (history := history_table(e)) else None,
        uplift_table=uplift.html() if (uplift := uplift_table(e)) else None,
        experts_table=experts_table(e.health).html(),
        shared_table=shared_table(e.health).html(),
        gates_table=gates_table(e.health).html(),
        tasks_table=tasks_table(e.health).html(),
        bins=RELIABILITY_BINS,
        sample_rows=SAMPLE_ROWS,
    )


def evaluation_markdown(e: Evaluation) -> str:
    h = e.health
    lines = [f"# {e.model} on {e.dataset}, {e.split} split", ""]
    lines += [
        f"- MLflow run: {e.run_id or 'none'}; checkpoint: {e.checkpoint}",
        f"- data: {e.log_path}, {e.rows:,} rows",
        "- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in e.seconds.items()),
        "",
        "## Anomalies",
        "",
    ]
    if e.flags:
        lines += [f"- {flag}" for flag in e.flags]
    else:
        lines += ["none" if h["experts"] else "no experts or gates: nothing to diagnose"]
    lines += ["", "## Per-task metrics", "", metrics_table(e).markdown(), ""]
    if (history := history_table(e)) is not None:
        lines += [f"## By history length ({e.history})", "", history.markdown(), ""]
    if (uplift := uplift_table(e)) is not None:
        lines += [f"## Uplift against {e.arms[0]}", "", uplift.markdown(), ""]
    if h["experts"]:
        lines += ["## Expert health", "", experts_table(h).markdown(), ""]
    if h["gates"]:
        lines += ["## Gates", "", gates_table(h).markdown(), ""]
    if h["gate_matrix"]["tasks"]:
        if h["shared_experts"]:
            lines += ["## Shared experts", "", shared_table(h).markdown(), ""]
        lines += ["## Own experts per task", "", tasks_table(h).markdown(), ""]
    return "\n".join(lines)


def print_evaluation(e: Evaluation, directory: Path, logged: bool) -> None:
    console = wide_console()
    console.print(metrics_table(e).rich(title=f"{e.name} on {e.dataset}, {e.split} split"))
    if (history := history_table(e)) is not None:
        console.print(history.rich(title=f"by length of the history '{e.history}'"))
    if (uplift := uplift_table(e)) is not None:
        console.print(uplift.rich(title=f"uplift of each arm against '{e.arms[0]}'"))
    for flag in e.flags:
        console.print(f"[bold red]{flag}[/]")
    if not e.flags:
        console.print("expert health: no anomaly" if e.health["experts"] else "no experts")
    console.print(f"report: {directory / 'report.html'} (and report.md, evaluation.json)")
    if logged:
        console.print(f"logged to MLflow run {e.run_id} under evaluation/{e.split}/")
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in e.seconds.items() if k != "total")
    console.print(
        f"{e.rows:,} rows evaluated in {e.seconds['total']:.1f} s ({seconds})", style="dim"
    )


# -- several evaluations ------------------------------------------------------------------------


def _delta_class(delta: float, better: str, base: float, value: float) -> str:
    if math.isnan(delta) or delta == 0:
        return ""
    if better == "one":
        gain = abs(base - 1) - abs(value - 1)
    else:
        gain = delta if better == "high" else -delta
    return "better" if gain > 0 else "worse" if gain < 0 else ""


def comparison_tables(evaluations: Sequence[Evaluation]) -> list[tuple[str, Table]]:
    """One table per metric: a row per task, each run's value and its difference to the first."""
    base, others = evaluations[0], evaluations[1:]
    oracle = all(e.oracle for e in evaluations)
    tables = []
    for metric, title, better in METRIC_COLUMNS:
        headers = ["task", base.name]
        for e in others:
            headers += [e.name, "Δ"]
        if oracle and metric in ("auc", "gauc"):
            headers.append("best")
        table = Table(headers)
        for task in [*base.tasks, "mean"]:
            first = base.value(metric, task)
            cells, classes = [task, fmt(first)], ["", ""]
            for e in others:
                value = e.value(metric, task)
                delta = value - first
                cells += [fmt(value), f"{delta:+.4f}" if not math.isnan(delta) else "-"]
                classes += ["", _delta_class(delta, better, first, value)]
            if oracle and metric in ("auc", "gauc"):
                cells.append(fmt(base.oracle.get(f"{metric}/{task}")))
                classes.append("")
            table.add(cells, classes)
        tables.append((title, table))
    return tables


def runs_table(evaluations: Sequence[Evaluation]) -> Table:
    table = Table(["run", "model", "parameters", "data", "rows", "checkpoint", "flags"])
    for e in evaluations:
        table.add(
            [
                e.name,
                e.model,
                fmt(e.params),
                e.log_path,
                fmt(e.rows),
                e.checkpoint,
                str(len(e.flags)),
            ],
            ["", "", "", "", "", "", "flagged" if e.flags else ""],
        )
    return table


def comparison_html(evaluations: Sequence[Evaluation], notes: Sequence[str]) -> str:
    tasks = evaluations[0].tasks
    labels = [e.name for e in evaluations]
    values = {
        metric.upper(): np.array([[e.value(metric, t) for t in tasks] for e in evaluations])
        for metric in ("auc", "gauc")
    }
    return TEMPLATES.get_template("comparison.html.j2").render(
        evaluations=evaluations,
        split=evaluations[0].split,
        runs_table=runs_table(evaluations).html(),
        tables=[(title, table.html()) for title, table in comparison_tables(evaluations)],
        bars=plots.compare_bars(labels, tasks, values),
        notes=notes,
    )


def comparison_markdown(evaluations: Sequence[Evaluation], notes: Sequence[str]) -> str:
    lines = [f"# Comparison of {len(evaluations)} runs, {evaluations[0].split} split", ""]
    lines += [runs_table(evaluations).markdown(), "", *notes, ""]
    for title, table in comparison_tables(evaluations):
        lines += [f"## {title}", "", table.markdown(), ""]
    lines += ["## Expert-health flags", ""]
    for e in evaluations:
        lines += [f"### {e.name}", ""]
        lines += [f"- {flag}" for flag in e.flags] or ["none"]
        lines.append("")
    return "\n".join(lines)


def print_comparison(evaluations: Sequence[Evaluation], directory: Path) -> None:
    console = wide_console()
    for title, table in comparison_tables(evaluations)[:2]:  # AUC and GAUC
        console.print(table.rich(title=f"{title}, {evaluations[0].split} split"))
    for e in evaluations:
        for flag in e.flags:
            console.print(f"[bold red]{e.name}: {flag}[/]")
    console.print(f"report: {directory / 'comparison.html'} (and comparison.md)")
