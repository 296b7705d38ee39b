"""The ``ranker`` command.

    ranker synth --out data/synthetic --rows 1000000      # generate a behaviour log
    ranker fit --config configs/trainer.yaml --config configs/model/mmoe.yaml \\
               --data.dataset configs/data/synthetic.yaml  # train, track in MLflow, report
    ranker evaluate --run <run id | checkpoint> [--split test]  # HTML + markdown report
    ranker compare <run> <run> ... [--split test]          # side by side, per task
    ranker predict --model <run> --log_path <log> --out <dir>  # batch scoring to Parquet
    ranker tune --space configs/tune/mmoe.yaml --trials 20 # Optuna search over `ranker fit`
    ranker export --run <run id | checkpoint>             # ONNX, parity-checked, registered
    ranker promote --name ranker-synthetic --alias champion

    ranker serve --model models:/ranker-synthetic@champion  # the scoring service

Every job is one line of ``JOBS``; each imports only what it needs when it runs: ``serve``
runs without torch or lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import CLI, ArgumentParser

from features.config import SPLITS, ConfigError


def synth(
    out: Path = Path("data/synthetic"),
    rows: int = 1_000_000,
    days: int = 14,
    start: str = "2024-01-01",
    users: int = 20_000,
    items: int = 50_000,
    authors: int = 5_000,
    seed: int = 0,
    drift: float = 0.2,
    swing: float = 1.0,
    interest: float = 0.6,
    explore: float = 0.05,
    candidates: int = 20,
    sharpness: float = 2.0,
    new_items: float = 0.0,
    rows_per_group: int = 65_536,
    treatments: int = 0,
    logged: bool = False,
) -> None:
    """Generate a synthetic Kuaishou-like behaviour log (hive-partitioned Parquet by date), or
    with ``--treatments`` uplift data (``features.synth_uplift``).

    Args:
        out: output directory (replaced if it holds an earlier log).
        rows: impressions.
        days: days, one partition each.
        start: first date, YYYY-MM-DD.
        users: distinct users.
        items: distinct items.
        authors: distinct authors.
        seed: random seed; the same arguments give the same log.
        drift: daily std of each user's interest drift (a random walk of the latent), relative
            to the static interest; 0 keeps interests static.
        swing: std of a day-to-day swing of each user's interest around its course (AR(1),
            persistent over a few days, averaging out over the log); 0: none.
        interest: share of the impressions the simulated retrieval stage draws from the
            user's interest of the day: the softmax pick (``sharpness``) among ``candidates``
            popular items. ``--interest 0 --explore 0 --swing 0``: the log as it was before
            these existed.
        explore: share of the impressions drawn uniformly from the catalogue (the rest: by
            popularity).
        candidates: popular items an interest retrieval picks among.
        sharpness: inverse temperature of that pick over the user's interest scores.
        new_items: share of the items and authors released during the log (from day 1 on,
            most seen while fresh) instead of before it; 0 keeps the catalogue fixed.
        rows_per_group: Parquet row-group size.
        treatments: > 0: generated uplift data instead (``configs/data/synthetic_uplift.yaml``
            reads ``--out data/uplift``): one row per customer, this many arms (control
            included), tiered true effects, every arm's true probabilities kept; the best
            achievable test Qini is printed. Uses ``rows`` and ``seed`` only.
        logged: with ``treatments``: arms assigned by the customers' features (known
            propensities, written as ``propensity``) rather than at random.
    """
    if treatments:
        return synth_uplift(out, rows, treatments, seed, logged)
    from features.synth import Exposure, generate_log, write_log
    from pipelines.report import print_synth_summary

    try:  # a bad knob: one line naming it, not a traceback
        frame = generate_log(
            rows=rows,
            days=days,
            start=start,
            users=users,
            items=items,
            authors=authors,
            seed=seed,
            drift=drift,
            new_items=new_items,
            exposure=Exposure(interest, explore, candidates, sharpness),
            swing=swing,
            static_truth=True,
        )
    except ValueError as err:
        raise ConfigError(f"synth: {err}") from None
    static = [c for c in frame.columns if c.startswith("p_static_")]
    path = write_log(frame.drop(static), out, rows_per_group=rows_per_group)
    print_synth_summary(frame, path)


def synth_uplift(out: Path, rows: int, treatments: int, seed: int, logged: bool) -> None:
    import numpy as np
    import polars as pl

    from features.synth_uplift import (
        TASKS,
        arm_names,
        generate_uplift,
        true_probabilities,
        write_uplift,
    )
    from ranker.uplift_metrics import uplift_metrics

    frame = generate_uplift(rows, treatments, seed, logged)
    path = write_uplift(frame, out)
    arms = arm_names(treatments)
    test = frame.filter(pl.col("split") == "test")
    best = uplift_metrics(
        true_probabilities(test, arms),
        test.select(TASKS).to_numpy().astype(np.float32),
        test["arm"].replace_strict(arms, list(range(len(arms)))).to_numpy(),
        arms,
        list(TASKS),
        test["propensity"].to_numpy() if logged else None,
    )
    print(f"{len(frame):,} customers, {treatments} arms -> {path}")
    print(frame.group_by("arm").agg(pl.len(), *(pl.col(t).mean() for t in TASKS)).sort("arm"))
    print("best achievable test Qini (the true uplift): " + ", ".join(
        f"{t}/{a} {best[f'qini/{t}/{a}']:.3f}" for t in TASKS for a in arms[1:]
    ))  # fmt: skip


def compare_cli(args: list[str]) -> None:
    from pipelines.evaluate import compare

    parser = ArgumentParser(prog="ranker compare", description=compare.__doc__)
    parser.add_argument("runs", nargs="+", help="MLflow run ids or checkpoint paths (2 or more)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to compare on")
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store")
    parser.add_argument(
        "--dataset",
        default=None,
        help="score every run on this dataset config's split (the same rows for all) instead "
        "of each run's own; nothing is logged",
    )
    options = parser.parse_args(args)
    compare(options.runs, options.split, options.out, options.tracking_uri, dataset=options.dataset)


def tune_cli(args: list[str]) -> None:
    import argparse

    from pipelines.tune import tune

    parser = argparse.ArgumentParser(
        prog="ranker tune",
        description="Hyperparameter search with Optuna (TPE, median pruning): each trial a "
        "`ranker fit`, tracked as a child MLflow run of the study's run; the best config is "
        "written as a YAML for `ranker fit --config`. Resumable: the same command continues.",
        epilog="Every other argument is passed to each trial's `ranker fit` (e.g. "
        "--data.dataset configs/data/kuairand.yaml --trainer.max_epochs 5).",
        allow_abbrev=False,
    )
    parser.add_argument("--space", type=Path, required=True, help="search space YAML")
    parser.add_argument("--trials", type=int, default=20, help="finished trials to reach")
    parser.add_argument("--study", default=None, help="study name (default: tune-<space>)")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: optuna.db beside a SQLite mlflow.db)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="best config (default: tuned/<study>.yaml)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="median: stop a trial below the median of earlier ones at an epoch",
    )
    parser.add_argument(
        "--startup_trials", type=int, default=5, help="finished trials before the pruner starts"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop after this many seconds (the running trial finishes)",
    )
    options, fit_args = parser.parse_known_args(args)
    if options.trials < 1:
        parser.error("--trials must be at least 1")
    tune(
        options.space,
        fit_args,
        trials=options.trials,
        study_name=options.study,
        storage=options.storage,
        out=options.out,
        seed=options.seed,
        pruner=options.pruner,
        startup_trials=options.startup_trials,
        timeout=options.timeout,
    )


@dataclass(frozen=True)
class Job:
    """One ``ranker`` command: its line in the help, what runs it (given the words after the
    command's name), and whether it runs Lightning (whose log handlers ``quiet`` then filters)."""

    help: str
    run: Callable[[list[str]], None]
    lightning: bool = False


def function_job(module: str, name: str) -> Callable[[list[str]], None]:
    """A job whose options are a function's arguments (jsonargparse reads its signature and
    docstring: ``ranker <job> --help``), imported only when the job runs."""

    def run(args: list[str]) -> None:
        CLI(getattr(importlib.import_module(module), name), args=args)

    return run


def fit_job(args: list[str]) -> None:
    from pipelines.cli import fit_cli

    words = ["fit", *args]
    # LightningCLI reads sys.argv when given no args (and warns when given both): from the
    # console they are these very words.
    fit_cli(None if sys.argv[1:] == words else words)


def serve_job(args: list[str]) -> None:
    from serving.cli import serve

    serve(args)


JOBS: dict[str, Job] = {
    "synth": Job(
        "generate a synthetic Kuaishou-like behaviour log (hive-partitioned Parquet)",
        function_job("pipelines.commands", "synth"),
    ),
    "fit": Job(
        "train a model on a dataset config: tracked in MLflow, calibrated, reported",
        fit_job,
        lightning=True,
    ),
    "tune": Job(
        "hyperparameter search with Optuna over `ranker fit`, best config as YAML",
        tune_cli,
        lightning=True,
    ),
    "evaluate": Job(
        "score a run or checkpoint on a split: per-task metrics, expert health, report",
        function_job("pipelines.evaluate", "evaluate"),
        lightning=True,
    ),
    "compare": Job("several runs side by side, per task", compare_cli),
    "predict": Job(
        "batch scoring of a log to Parquet (one row out per row in), for offline jobs",
        function_job("pipelines.predict", "predict"),
        lightning=True,
    ),
    "export": Job(
        "export a run to ONNX (features in the graph), parity-checked, registered",
        function_job("pipelines.export", "export"),
        lightning=True,
    ),
    "promote": Job(
        "point a registered model's alias (e.g. champion) at a version",
        function_job("pipelines.export.registry", "promote"),
        lightning=True,
    ),
    "serve": Job(
        "the online scoring service (FastAPI + onnxruntime) for a registered model", serve_job
    ),
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [f"  {name:<{width}}  {job.help}" for name, job in JOBS.items()]
    return (
        "usage: ranker <command> [options] [--verbose]   (ranker <command> --help: its "
        "options; --verbose: third-party messages and warnings too)\n\n"
        "commands:\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in words  # every command: third-party chatter and warnings kept
    words = [w for w in words if w != "--verbose"]
    if argv is None:
        sys.argv[1:] = words  # LightningCLI reads sys.argv itself
    command, args = (words[0], words[1:]) if words else ("", [])
    if command in ("", "-h", "--help", "help"):
        print(usage(), end="", file=sys.stdout if command else sys.stderr)
        raise SystemExit(0 if command else 2)
    job = JOBS.get(command)
    if job is None:
        print(
            f"ranker: error: unknown command '{command}' (commands: {', '.join(JOBS)})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if not verbose:
        from pipelines.quiet import quiet

        if job.lightning:
            import lightning.pytorch  # noqa: F401 -- its log handlers, to filter

        quiet()
    try:
        job.run(args)
    except ConfigError as err:
        print(f"ranker: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
