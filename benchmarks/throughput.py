"""Training throughput: is data loading the bottleneck?

Builds the model and DataModule exactly as ``ranker fit`` does (same configs, same CLI), then
measures, on the training split of a log:

  data path     the DataLoader alone (read row groups, join, transform, shuffle, batch);
  ceiling       the model's training step on batches already in memory, in the same loop;
  end to end    ``Trainer.fit`` on the DataModule, as a user runs it.

    python benchmarks/throughput.py --log data/bench1m [--rows 1000000] [--model mmoe]
                                    [--workers 1] [--batch-size 2048]

Generates the log first if the directory does not exist. Prints one table.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
from lightning import Trainer
from rich.table import Table
from torch.utils.data import DataLoader

from features.datamodule import RankerDataModule
from features.synth import generate
from pipelines.cli import RankerCLI
from pipelines.report import wide_console
from ranker.module import RankerModule

ROOT = Path(__file__).resolve().parents[1]


def build(model: str, log: Path, workers: int, batch_size: int) -> RankerCLI:
    args = [
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
        "--trainer.logger",
        "false",
    ]
    return RankerCLI(
        RankerModule,
        RankerDataModule,
        args=args,
        run=False,
        save_config_callback=None,
    )


def fit_epoch(module: RankerModule, **fit_kwargs: object) -> float:
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, **fit_kwargs)
    return float(trainer.callback_metrics["train/samples_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "data" / "bench1m")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the table readable
    if not args.log.exists():
        generate(args.log, rows=args.rows)
    torch.manual_seed(0)
    cli = build(args.model, args.log, args.workers, args.batch_size)
    dm, initial = cli.datamodule, cli.model
    rows = dm.split_rows["train"]

    start = time.perf_counter()
    batches = [b for b in dm.train_dataloader()]
    data_path = sum(len(b[0]) for b in batches) / (time.perf_counter() - start)

    in_memory = DataLoader(batches, batch_size=None, shuffle=False)
    ceiling = fit_epoch(copy.deepcopy(initial), train_dataloaders=in_memory)
    end_to_end = fit_epoch(copy.deepcopy(initial), datamodule=dm)

    table = Table(
        title=f"{type(initial.network).__name__} training throughput, {rows:,} train "
        f"rows of {args.log}, batch {args.batch_size}, {args.workers} worker(s), "
        f"{torch.get_num_threads()} torch threads"
    )
    for column in ("path", "samples/s", "vs ceiling"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, value in (
        ("data path alone", data_path),
        ("model step, tensors in memory", ceiling),
        ("end to end (Trainer.fit on the DataModule)", end_to_end),
    ):
        table.add_row(name, f"{value:,.0f}", f"{value / ceiling:.2f}x")
    wide_console().print(table)


if __name__ == "__main__":
    main()
