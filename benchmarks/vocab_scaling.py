"""HoME's training step time as the embedding vocabulary grows (sparse vs dense updates).

    python benchmarks/vocab_scaling.py [--model home] [--sizes 1e4 1e5 1e6 1e7] [--steps 20]

A user id and an item id feature each get ``V`` rows (so the table holds ~2V rows), beside a
few small categorical and numeric features; batches of 2048 draw ids from a Zipf-like law, as
logs do. Each step is what ``RankerModule.training_step`` does: the masked multi-task BCE,
backward, SparseAdam on the embedding table and AdamW on the dense part. The ``dense`` column
runs the same model with ordinary (dense) embedding gradients and AdamW over the whole table:
what the step would cost without sparse updates. Prints the median ms per step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.table import Table

from features.config import TaskSpec
from features.state import InputSpec
from pipelines.report import wide_console
from ranker.loss import masked_bce
from ranker.models import build as build_network

ROOT = Path(__file__).resolve().parents[1]
TASKS = tuple(
    TaskSpec(name, name, group)
    for name, group in [
        ("click", "watch"),
        ("effective_view", "watch"),
        ("long_view", "watch"),
        ("like", "interaction"),
        ("comment", "interaction"),
        ("forward", "interaction"),
        ("follow", "interaction"),
        ("collect", "interaction"),
    ]
)


def build(model: str, vocab: int, sparse: bool) -> tuple[torch.nn.Module, list]:
    network = yaml.safe_load((ROOT / "configs" / "model" / f"{model}.yaml").read_text())
    network = network["model"]["network"]
    inputs = InputSpec(
        cat_names=("user_id", "item_id", "hour", "page", "category"),
        cardinalities=(vocab, vocab, 25, 5, 41),
        embedding_dims=(16,) * 5,
        num_names=("duration", "follows", "age"),
    )
    net = build_network(network, inputs, TASKS)
    table = list(net.embedding.parameters())
    dense = [p for n, p in net.named_parameters() if not n.startswith("embedding.")]
    if sparse:
        optimizers = [torch.optim.AdamW(dense, lr=1e-3), torch.optim.SparseAdam(table, lr=0.05)]
    else:
        for embedding in net.embedding.tables:
            embedding.sparse = False
        optimizers = [torch.optim.AdamW(dense + table, lr=1e-3)]
    return net, optimizers


def batches(vocab: int, n: int, size: int = 2048) -> list[tuple[torch.Tensor, ...]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = np.minimum(rng.zipf(1.2, (size, 2)) - 1, vocab - 1)
        small = np.stack([rng.integers(0, c, size) for c in (25, 5, 41)], 1)
        cat = torch.from_numpy(np.concatenate([ids, small], 1).astype(np.int64))
        num = torch.randn(size, 3)
        labels = torch.from_numpy((rng.random((size, len(TASKS))) < 0.1).astype(np.float32))
        out.append((cat, num, labels))
    return out


def step_ms(model: str, vocab: int, sparse: bool, steps: int) -> float:
    torch.manual_seed(0)
    net, optimizers = build(model, vocab, sparse)
    weights = torch.ones(len(TASKS))
    times = []
    for i, (cat, num, labels) in enumerate(batches(vocab, steps + 3)):
        start = time.perf_counter()
        loss, _ = masked_bce(net(cat, num)["logits"], labels, weights)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="home")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-up-to", type=float, default=1e7)
    args = parser.parse_args()
    table = Table(
        title=f"{args.model}: median ms per training step, batch 2048, "
        f"{torch.get_num_threads()} torch threads"
    )
    for column in (
        "rows per id feature",
        "table rows",
        "sparse (SparseAdam)",
        "dense (AdamW on all)",
        "dense / sparse",
    ):
        table.add_column(column, justify="right")
    for size in args.sizes:
        vocab = int(size)
        sparse = step_ms(args.model, vocab, True, args.steps)
        dense = step_ms(args.model, vocab, False, args.steps) if size <= args.dense_up_to else None
        table.add_row(
            f"{vocab:,}",
            f"{2 * vocab + 71:,}",
            f"{sparse:.1f}",
            "-" if dense is None else f"{dense:.1f}",
            "-" if dense is None else f"{dense / sparse:.1f}x",
        )
        wide_console().print(f"done {vocab:,}")
    wide_console().print(table)


if __name__ == "__main__":
    main()
