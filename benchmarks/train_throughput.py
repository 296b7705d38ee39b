"""Training throughput: does the data path keep up with the model, and does memory stay flat?

For each generated log size and each model, three measurements, each in its own process
(so each has its own peak RSS):

  data path     one epoch of the training DataLoader alone (read row groups, join, transform,
                shuffle, batch), after the feature fit;
  ceiling       the model's training step on batches already in memory (the first
                ``--ceiling-batches`` of the epoch): the fastest training can go;
  ranker fit    ``ranker fit`` end to end, one epoch, as a user runs it (its own
                ``train/samples_per_sec``: first to last training batch; validation and the
                after-fit report are in the wall time and the RSS, not in samples/s).

    python benchmarks/train_throughput.py [--rows 1000000 10000000] [--models mmoe home]
        [--data-dir data/bench] [--workers 0] [--batch-size 2048] [--accelerator auto]

Logs are generated under ``--data-dir`` the first time. Prints one table, then the targets:
ranker fit >= 85% of the ceiling, data path >= 3x the ceiling, peak RSS at the largest log
within 1.2x of the smallest; and each model's FLOP per sample (forward and backward, counted
by ``FlopCounterMode``), the machine's fp32 matmul peak (``torch.mm`` of two 4096 x 4096
matrices) and the share of it the step and ``ranker fit`` reach (``benchmarks/train_step.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RANKER = Path(sys.executable).parent / "ranker"


def cli_args(model: str, log: Path, workers: int, batch_size: int, accelerator: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "trainer.yaml"),
        "--config",
        str(ROOT / "configs" / "model" / f"{model}.yaml"),
        "--data.dataset",
        str(ROOT / "configs" / "data" / "synthetic.yaml"),
        "--data.log_path",
        str(log),
        "--data.num_workers",
        str(workers),
        "--data.batch_size",
        str(batch_size),
        "--trainer.accelerator",
        accelerator,
        "--trainer.max_epochs",
        "1",
    ]


# -- the measurements, each run in a child process --------------------------------------------


def one_epoch(
    module: object, accelerator: str, batches: int | None = None, **fit_kwargs: object
) -> float:
    """samples/s of one epoch (its first ``batches``), by the model's own clock."""
    from lightning import Trainer

    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        limit_train_batches=batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, **fit_kwargs)
    return float(trainer.callback_metrics["train/samples_per_sec"])


def measure(cell: str, model: str, log: Path, args: argparse.Namespace) -> dict[str, float]:
    """One measurement, with the model and data ``ranker fit`` builds from the same configs
    (built directly: this runs where MLflow, which the CLI needs, is not installed)."""
    import torch
    import yaml
    from torch.utils.data import DataLoader

    from features.datamodule import RankerDataModule
    from ranker.models import build
    from ranker.module import RankerModule

    torch.manual_seed(0)
    data = RankerDataModule(
        str(ROOT / "configs" / "data" / "synthetic.yaml"),
        log_path=str(log),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    config = yaml.safe_load((ROOT / "configs" / "model" / f"{model}.yaml").read_text())["model"]
    network = config.pop("network")
    module = RankerModule(
        lambda inputs, tasks: build(network, inputs, tasks),
        inputs=data.input_spec,
        tasks=data.tasks,
        **config,
    )
    if cell == "trainer":  # end to end without the CLI and MLflow: Trainer.fit on the DataModule
        return {"samples_per_sec": one_epoch(module, args.accelerator, datamodule=data)}
    if cell == "data":
        # Steady state, from the first batch to the last, as the model's own clock counts
        # (loader workers' start-up is reported apart, the feature fit before either).
        _ = data.state, data.split_pieces
        start, rows, first = time.perf_counter(), 0, None
        for batch in data.train_dataloader():
            if first is None:
                first = time.perf_counter()
            else:
                rows += len(batch)
        return {
            "samples_per_sec": rows / (time.perf_counter() - first),
            "first_batch_s": first - start,
        }
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == args.ceiling_batches:
            break
    memory = DataLoader(batches, batch_size=None)
    from benchmarks.train_step import flop_per_sample, matmul_peak

    flops, peak = flop_per_sample(module, batches[0]), matmul_peak()
    return {
        "samples_per_sec": one_epoch(module, args.accelerator, train_dataloaders=memory),
        "flop_per_sample": flops,
        "peak_flops": peak,
    }


# -- the parent: runs each cell in a child, reads its peak RSS ---------------------------------


def run_child(command: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """(stdout, peak RSS in GB, wall seconds) of a child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=env and env["CWD"])
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{err.read()[-4000:]}")
        return out.read(), usage.ru_maxrss / 2**20, time.perf_counter() - start


def fit_cell(model: str, log: Path, args: argparse.Namespace) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as work:
        uri = f"sqlite:///{work}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CWD": work}
        flags = cli_args(model, log, args.workers, args.batch_size, args.accelerator)
        command = [str(RANKER), "fit", *flags, "--trainer.enable_progress_bar", "false"]
        _, rss, wall = run_child(command, env)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])
        return {
            "samples_per_sec": run.data.metrics["train/samples_per_sec"],
            "rss_gb": rss,
            "wall_s": wall,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--models", nargs="+", default=["mmoe", "home"])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--ceiling-batches", type=int, default=300)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--fit",
        choices=["ranker", "trainer"],
        default="ranker",
        help="end to end as `ranker fit` (needs MLflow) or as Trainer.fit in a process",
    )
    parser.add_argument("--cell", choices=["data", "ceiling", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.cell:  # a child: one measurement, as JSON on stdout
        print(json.dumps(measure(args.cell, args.model, args.log, args)))
        return

    # The parent stays small (no generator, no torch): a child's peak RSS counts the pages it
    # was forked with.
    from rich.console import Console
    from rich.table import Table

    results = []
    for rows in args.rows:
        log = args.data_dir / f"synth{rows // 1000}k"
        if not log.exists():
            script = f"from features.synth import generate; generate({str(log)!r}, rows={rows})"
            _, rss, wall = run_child([sys.executable, "-c", script], {**os.environ, "CWD": ROOT})
            print(f"generated {log} in {wall:.0f} s, peak RSS {rss:.1f} GB", flush=True)
        for model in args.models:
            cell = {"rows": rows, "model": model}
            names = ("data", "ceiling", "trainer") if args.fit == "trainer" else ("data", "ceiling")
            for name in names:
                command = [
                    sys.executable,
                    __file__,
                    "--cell",
                    name,
                    "--model",
                    model,
                    "--log",
                    str(log),
                    "--workers",
                    str(args.workers),
                    "--batch-size",
                    str(args.batch_size),
                    "--accelerator",
                    args.accelerator,
                    "--ceiling-batches",
                    str(args.ceiling_batches),
                ]
                out, rss, wall = run_child(command)
                cell[name] = {
                    **json.loads(out.strip().splitlines()[-1]),
                    "rss_gb": rss,
                    "wall_s": wall,
                }
            cell["fit"] = (
                cell.pop("trainer") if args.fit == "trainer" else fit_cell(model, log, args)
            )
            results.append(cell)
            print(json.dumps(cell), flush=True)

    table = Table(
        title=f"Training throughput, generated logs, batch {args.batch_size}, "
        f"{args.workers} loader worker(s), accelerator {args.accelerator}, "
        f"{os.cpu_count()} CPUs"
    )
    for column in ("log rows", "model", "path", "samples/s", "vs ceiling", "peak RSS GB", "wall s"):
        table.add_column(column, justify="left" if column in ("model", "path") else "right")
    end_to_end = "ranker fit" if args.fit == "ranker" else "Trainer.fit"
    for cell in results:
        ceiling = cell["ceiling"]["samples_per_sec"]
        for name, label in (
            ("data", "data path"),
            ("ceiling", "model step (ceiling)"),
            ("fit", end_to_end),
        ):
            value = cell[name]
            table.add_row(
                f"{cell['rows']:,}",
                cell["model"],
                label,
                f"{value['samples_per_sec']:,.0f}",
                f"{value['samples_per_sec'] / ceiling:.2f}x",
                f"{value['rss_gb']:.2f}",
                f"{value['wall_s']:.0f}",
            )
    Console(width=200).print(table)
    smallest, largest = min(args.rows), max(args.rows)
    for cell in results:
        ceiling = cell["ceiling"]["samples_per_sec"]
        fit, data = cell["fit"]["samples_per_sec"], cell["data"]["samples_per_sec"]
        flops, peak = cell["ceiling"]["flop_per_sample"], cell["ceiling"]["peak_flops"]
        line = (
            f"{cell['model']} {cell['rows']:,}: {end_to_end} {fit / ceiling:.0%} of the "
            f"ceiling (target >= 85%), data path {data / ceiling:.1f}x (target >= 3x); "
            f"{flops / 1e6:.2f} MFLOP per sample, matmul peak {peak / 1e9:.0f} GFLOP/s: the "
            f"step at {ceiling * flops / peak:.0%} of it, {end_to_end} at {fit * flops / peak:.0%}"
        )
        if cell["rows"] == largest and largest != smallest:
            base = next(c for c in results if c["rows"] == smallest and c["model"] == cell["model"])
            growth = {n: cell[n]["rss_gb"] / base[n]["rss_gb"] for n in ("data", "fit")}
            line += (
                f"; peak RSS {largest:,} / {smallest:,} rows: data path "
                f"{growth['data']:.2f}x, {end_to_end} {growth['fit']:.2f}x (target <= 1.2x)"
            )
        print(line)


if __name__ == "__main__":
    main()
