"""The data path overlapped with the step: training with batches made between steps against
batches made ahead by a thread (``--data.prefetch_batches``), same run, alternating rounds.

    python benchmarks/prefetch.py --log <generated log> [--models shared_bottom mmoe home]
        [--prefetch 0 2] [--batches 200] [--rounds 3] [--batch-size 2048]

Each round trains every model for ``--batches`` batches of the log's training split with
``Trainer.fit`` (the model and data ``ranker fit`` builds; no validation, no logger), once per
prefetch depth, in alternating order; samples/s is the model's own clock (first to last
training batch). Prints the machine, one row per model and depth (every round, the median)
and the median ratio of each depth to the first. A cheap step (``shared_bottom``) shows what
the data path costs when the step is fast, as a bf16 step on AMX is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.suite import machine  # noqa: E402
from benchmarks.train_step import build_module, matmul_peak  # noqa: E402
from benchmarks.train_throughput import one_epoch  # noqa: E402
from features.datamodule import RankerDataModule  # noqa: E402


def samples_per_sec(model: str, log: Path, prefetch: int, args: argparse.Namespace) -> float:
    data = RankerDataModule(
        str(ROOT / "configs" / "data" / "synthetic.yaml"),
        log_path=str(log),
        batch_size=args.batch_size,
        prefetch_batches=prefetch,
    )
    return one_epoch(build_module(model, data), "cpu", args.batches, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["shared_bottom", "mmoe", "home"])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()
    print(f"{machine()}; matmul peak {matmul_peak() / 1e9:.0f} GFLOP/s")
    results: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        depths = args.prefetch if round_ % 2 == 0 else args.prefetch[::-1]
        for model in args.models:
            for depth in depths:
                value = samples_per_sec(model, args.log, depth, args)
                results.setdefault((model, depth), []).append(value)
                print(f"round {round_}: {model} prefetch {depth}: {value:,.0f} samples/s")
    print(f"\n| model | prefetch_batches | samples/s per round | median | vs {args.prefetch[0]} |")
    print("|---|---|---|---|---|")
    for model in args.models:
        base = statistics.median(results[(model, args.prefetch[0])])
        for depth in args.prefetch:
            values = results[(model, depth)]
            median = statistics.median(values)
            rounds = " / ".join(f"{v:,.0f}" for v in values)
            print(f"| {model} | {depth} | {rounds} | {median:,.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
