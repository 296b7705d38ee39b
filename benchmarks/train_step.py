"""The training step against the machine's peak: FLOP per sample, samples/s, share of peak.

    python benchmarks/train_step.py [--log data/bench/synth1000k] [--models mmoe home]
        [--batch-size 2048] [--batches 8] [--rounds 6] [--variants eager compiled bf16]

The step is ``RankerModule.training_step`` without Lightning around it: the forward pass
(embedding lookup included), the loss, the backward pass, AdamW on the dense part and
SparseAdam on the embedding rows, on batches of a generated log already in memory.

- **FLOP per sample**: ``torch.utils.flop_counter.FlopCounterMode`` over the forward and
  backward pass of one batch (matmuls and the like; elementwise work is not counted).
- **Peak**: ``torch.mm`` of two 4096 x 4096 fp32 matrices on the same threads, best of 5.
- **Variants**, timed in interleaved rounds (each round runs every variant over the same
  batches, so the VM's drift falls on all alike): ``eager``; ``per-task`` (every pool, gate
  and tower on its own, as before they were batched); ``compiled`` (``--model.compile
  true``: the dense part after the lookup through ``torch.compile``; the first step, which
  compiles, is timed apart); ``bf16`` (eager under ``torch.autocast(bfloat16)``, as
  ``--trainer.precision bf16-mixed`` trains: native on AMX CPUs, emulated and slow without).

Prints one markdown table: model, variant, FLOP per sample, samples/s (median round), GFLOP/s
and the share of the peak.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.datamodule import RankerDataModule, TensorBatch  # noqa: E402
from ranker.experts import ExpertLayer  # noqa: E402
from ranker.layers import linear  # noqa: E402
from ranker.loss import masked_bce  # noqa: E402
from ranker.models import build  # noqa: E402
from ranker.models.base import ExpertModel  # noqa: E402
from ranker.module import RankerModule  # noqa: E402


def matmul_peak(size: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of ``torch.mm`` of two ``size`` x ``size`` matrices of ``dtype`` (best of
    ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def build_module(model: str, data: RankerDataModule, **options: object) -> RankerModule:
    config = yaml.safe_load((ROOT / "configs" / "model" / f"{model}.yaml").read_text())["model"]
    network = config.pop("network")
    torch.manual_seed(0)
    return RankerModule(
        lambda inputs, tasks: build(network, inputs, tasks),
        inputs=data.input_spec,
        tasks=data.tasks,
        **{**config, **options},
    )


def step(module: RankerModule, optimizers: list, batch: TensorBatch) -> None:
    """What ``RankerModule.training_step`` computes, without the trainer's logging."""
    outputs, auxiliary = module.network.training_forward(*batch.inputs)
    _, per_task = masked_bce(outputs["logits"], batch.labels, module.task_weights)
    present = (~torch.isnan(batch.labels)).any(0)
    loss = module.weighting(per_task, present) + sum(auxiliary.values(), torch.zeros(()))
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    dense, sparse = optimizers
    dense.step()
    module.row_rates.step(sparse)


def flop_per_sample(module: RankerModule, batch: TensorBatch) -> float:
    with FlopCounterMode(display=False) as counter:
        outputs, _ = module.network.training_forward(*batch.inputs)
        masked_bce(outputs["logits"], batch.labels, module.task_weights)[0].backward()
    module.zero_grad()
    return counter.get_total_flops() / len(batch)


def variant_context(name: str) -> contextlib.AbstractContextManager:
    """What a variant's steps run under: ``per-task`` unbatched, ``bf16`` under bf16 autocast
    (what ``--trainer.precision bf16-mixed`` does), else nothing."""
    if name == "per-task":
        return one_by_one()
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def one_by_one() -> Iterator[None]:
    """Every pool, gate, mixture and tower computed on its own (the code before they were
    batched)."""

    def pool_outputs(self, read):
        return {p.name: self.pools[p.name](read(p.inputs)) for p in self.pool_specs}

    def gate_logits(self, read):
        return {g.name: linear(read(g.inputs), self.gates[g.name]) for g in self.gate_specs}

    def mix(self, outputs, logits, read, internals):
        new = {}
        for g in self.gate_specs:
            experts = torch.cat([outputs[p] for p in g.pools], dim=1)
            weights, _ = self.routing.route(logits[g.name])
            new[g.name] = (weights.unsqueeze(-1) * experts).sum(1)
            for pool in g.always:
                new[g.name] = new[g.name] + outputs[pool].sum(1)
            if g.residual:
                own = outputs[g.own]
                residual = self.residuals[g.name].coefficients(read(g.inputs), weights)
                new[g.name] = new[g.name] + (residual.unsqueeze(-1) * own).sum(1)
        return new

    def towers_on(self, reps, internals):
        for layer in self.layers:
            reps = layer(reps, internals)
        logits = [tower(reps[k]) for k, tower in zip(self.task_keys, self.towers, strict=True)]
        return {"logits": torch.stack(logits, dim=1)}

    saved = (
        ExpertLayer._pool_outputs, ExpertLayer._gate_logits, ExpertLayer._mix, ExpertModel.towers_on
    )  # fmt: skip
    ExpertLayer._pool_outputs, ExpertLayer._gate_logits = pool_outputs, gate_logits
    ExpertLayer._mix, ExpertModel.towers_on = mix, towers_on
    try:
        yield
    finally:
        (
            ExpertLayer._pool_outputs, ExpertLayer._gate_logits, ExpertLayer._mix,
            ExpertModel.towers_on,
        ) = saved  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "data" / "bench" / "synth1000k")
    parser.add_argument("--models", nargs="+", default=["mmoe", "home"])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--variants", nargs="+", default=["per-task", "eager"],
        choices=["per-task", "eager", "compiled", "bf16"],
    )  # fmt: skip
    args = parser.parse_args()
    if not args.log.exists():
        from features.synth import generate

        generate(args.log, rows=1_000_000)
    data = RankerDataModule(
        str(ROOT / "configs" / "data" / "synthetic.yaml"),
        log_path=str(args.log),
        batch_size=args.batch_size,
    )
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == args.batches + 1:
            break
    warm, batches = batches[0], batches[1:]
    peak = matmul_peak()
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    if "bf16" in args.variants:  # "of peak" stays against fp32's
        bf16 = matmul_peak(2048, 3, torch.bfloat16)  # 2048: emulated bf16 (no AMX) is slow
        print(f"bf16 matmul peak: {bf16 / 1e9:.1f} GFLOP/s")
    print()
    rows = []
    for model in args.models:
        variants, flops, compile_s = {}, 0.0, {}
        for name in args.variants:
            module = build_module(model, data, compile=name == "compiled").train()
            optimizers = module.configure_optimizers()
            optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
            module.compile_network()
            with variant_context(name):
                flops = flops or flop_per_sample(module, warm)
                compile_s[name] = _timed(lambda m=module, o=optimizers: step(m, o, warm))
            variants[name] = (module, optimizers)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (module, optimizers) in variants.items():
                with variant_context(name):
                    seconds[name].append(
                        _timed(lambda m=module, o=optimizers: [step(m, o, b) for b in batches])
                    )
        samples = sum(len(b) for b in batches)
        for name, times in seconds.items():
            rate = samples / statistics.median(times)
            rows.append(
                [model, name, f"{flops / 1e6:.2f}", f"{rate:,.0f}", f"{rate * flops / 1e9:.1f}",
                 f"{rate * flops / peak:.0%}", f"{compile_s[name]:.1f}"]
            )  # fmt: skip
    header = ["model", "variant", "MFLOP / sample", "samples/s", "GFLOP/s", "of peak",
              "first step s"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
