"""Memory and speed of the embedding tables replicated on every rank vs sharded by TorchRec.

    ranker synth --out /work/shbench/log --rows 3000000 --users 3000000 --items 10000000
    python benchmarks/sharding.py --log /work/shbench/log --batches 60 --id-dim 128

One process, 2 DDP ranks with a replica of every table (row-wise Adagrad, and SparseAdam, the
default), and 2 ranks with the tables sharded (``--model.sharding torchrec``, table-wise,
row-wise Adagrad), each a fresh ``torchrun`` of this file, one after the other. Each rank
reports its resident memory (RSS) once the model is built, at the first training step (tables
sharded, optimiser state allocated), after the last step, and its peak; and the samples/s of
the timed steps (all but the first 10). The tables' share: bytes of weights and optimiser
state a rank holds. Prints the CPU, the vocabularies and one table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 10
CONFIG = ROOT / "configs" / "data" / "synthetic.yaml"
MODES = {  # name: (processes, sharding, embedding optimiser)
    "one process, row-wise Adagrad": (1, "none", "rowwise_adagrad"),
    "2 ranks replicated, row-wise Adagrad": (2, "none", "rowwise_adagrad"),
    "2 ranks replicated, SparseAdam": (2, "none", "sparse_adam"),
    "2 ranks sharded (TorchRec), row-wise Adagrad": (2, "torchrec", "rowwise_adagrad"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table_bytes(module: object) -> int:
    """Bytes of the tables and their optimiser state this rank holds."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def local(t: object) -> int:
        if isinstance(t, ShardedTensor):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    network = module.network  # type: ignore[attr-defined]
    total = sum(local(v) for v in network.embedding.state_dict().values())
    for optimiser in module.trainer.optimizers[1:]:  # type: ignore[attr-defined]
        for state in optimiser.state_dict()["state"].values():
            total += sum(local(v) for v in state.values())
    return total


def child(args: argparse.Namespace) -> None:
    """One run (one rank of it): fit ``--batches`` steps, write what it measured."""
    import lightning as L
    import torch

    from features.datamodule import RankerDataModule
    from ranker.models import build
    from ranker.module import RankerModule

    processes, sharding, optimiser = MODES[args.mode]
    data = RankerDataModule(dataset(args), log_path=args.log, batch_size=args.batch_size)
    torch.manual_seed(0)
    network = {"class_path": "ranker.models.MMoE", "init_args": {"num_experts": 4}}
    found: dict[str, float] = {}

    class Measured(RankerModule):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == 0:
                found["rss_first_step"] = rss_mb()
            if batch_idx == WARMUP:
                found["start"] = time.perf_counter()
            return super().training_step(batch, batch_idx)

        def on_train_end(self) -> None:
            found["seconds"] = time.perf_counter() - found["start"]
            found["tables_mb"] = table_bytes(self) / 2**20

    module = Measured(
        lambda inputs, tasks: build(network, inputs, tasks),
        inputs=data.input_spec, tasks=data.tasks, embedding_optimizer=optimiser,
        sharding=sharding,
    )  # fmt: skip
    found["rss_built"] = rss_mb()
    trainer = L.Trainer(
        accelerator="cpu", devices=processes, strategy="ddp" if processes > 1 else "auto",
        max_epochs=1, limit_train_batches=args.batches, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    found["rss_end"], found["rss_peak"] = rss_mb(), peak_mb()
    found["samples_per_s"] = (args.batches - WARMUP) * args.batch_size / found["seconds"]
    rows = sum(data.input_spec.cardinalities)
    found["table_rows"] = rows
    Path(f"{args.out}.{trainer.global_rank}.json").write_text(json.dumps(found))


def dataset(args: argparse.Namespace) -> str:
    """The generated log's config, its id features (user, item, author) ``--id-dim`` wide."""
    text = CONFIG.read_text()
    for name in ("user_id", "item_id", "author_id"):
        text = text.replace(
            f"{{name: {name}, kind: categorical, side: {'user' if name == 'user_id' else 'item'}, "
            "embedding_dim: 16}",
            f"{{name: {name}, kind: categorical, side: {'user' if name == 'user_id' else 'item'}, "
            f"embedding_dim: {args.id_dim}}}",
        )
    path = Path(f"{args.out}.dataset.yaml")
    path.write_text(text)
    return str(path)


def launch(mode: str, args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    processes = MODES[mode][0]
    me = [str(Path(__file__).resolve()), "--child", "--mode", mode, "--parquet", args.log,
          "--batches", str(args.batches), "--batch-size", str(args.batch_size),
          "--out", str(out), "--id-dim", str(args.id_dim)]  # fmt: skip
    if processes == 1:
        command = [sys.executable, *me]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        command = [torchrun, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", "29571", *me]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", "--parquet", dest="log", required=True)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--id-dim", type=int, default=16, help="user / item / author width")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--mode", default="")
    parser.add_argument("--out", default="/tmp/sharding-bench")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from benchmarks.suite import machine

    print(machine())
    rows = []
    for mode in MODES:
        ranks = launch(mode, args, Path(args.out))
        for rank, found in enumerate(ranks):
            rows.append((mode, rank, found))
    print(f"\ntables: {rows[0][2]['table_rows']:,} rows (ids {args.id_dim} wide, the rest 16), "
          f"MMoE, batch "
          f"{args.batch_size} per rank, {args.batches} steps ({WARMUP} untimed)\n")  # fmt: skip
    print("| run | rank | tables + optimiser state held (MB) | RSS built (MB) | RSS at first "
          "step | RSS at end | peak RSS | samples/s (all ranks) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for mode, rank, f in rows:
        speed = f["samples_per_s"] * MODES[mode][0]
        print(f"| {mode} | {rank} | {f['tables_mb']:,.0f} | {f['rss_built']:,.0f} | "
              f"{f['rss_first_step']:,.0f} | {f['rss_end']:,.0f} | {f['rss_peak']:,.0f} | "
              f"{speed:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
