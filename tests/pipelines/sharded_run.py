"""One seeded model trained with its tables sharded by TorchRec, replicated, or in one process.

    torchrun --nproc_per_node 2 tests/pipelines/sharded_run.py <sharded|replicated> <model>
        <log> <out> <epochs> [<checkpoint to resume>]
    python tests/pipelines/sharded_run.py one <model> <log> <out> <epochs>

sharded / replicated: 2 ranks (gloo), the tables sharded (``--model.sharding torchrec``) or a
replica on each rank (today's DDP). one: one process whose every step takes both ranks' batches
of that step together (the global batch the two ranks share). ``model``: mmoe, home or aw_moe, with
row-wise Adagrad on the tables (the optimiser TorchRec fuses on CPU) and no id dropout.
Rank 0 writes ``<out>.json`` (each step's training loss, the mean over ranks, and the last
validation metrics) and ``<out>.ckpt`` (``Trainer.save_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from features.datamodule import ParquetBatches, RankerDataModule, TensorBatch  # noqa: E402
from ranker.models import build  # noqa: E402
from ranker.module import RankerModule  # noqa: E402

NETWORKS = {
    "mmoe": {
        "class_path": "ranker.models.MMoE",
        "init_args": {"num_experts": 3, "expert_hidden": [16]},
    },
    "home": {"class_path": "ranker.models.HoME", "init_args": {"expert_hidden": [32, 16]}},
    "aw_moe": {
        "class_path": "ranker.models.AWMoE",
        "init_args": {"num_experts": 3, "expert_hidden": [16]},
    },
}


class Recording(RankerModule):
    """Trains as usual and keeps each step's training loss."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def training_step(self, batch: TensorBatch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss))
        return loss


def together(batches: list[TensorBatch]) -> TensorBatch:
    """The rows of ``batches`` in one batch, in order."""
    fields = {}
    for f in dataclasses.fields(TensorBatch):
        values = [getattr(b, f.name) for b in batches]
        if isinstance(values[0], dict):
            fields[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
        else:
            fields[f.name] = None if values[0] is None else torch.cat(values)
    return TensorBatch(**fields)


class GlobalBatches(IterableDataset):
    """The training batches two ranks take, each step's pair as one batch."""

    def __init__(self, dataset: ParquetBatches) -> None:
        self.ranks = [_copy(dataset, rank) for rank in (0, 1)]

    def __iter__(self) -> Iterator[TensorBatch]:
        for pair in zip(*self.ranks, strict=True):
            yield together(list(pair))


def _copy(dataset: ParquetBatches, rank: int) -> ParquetBatches:
    copy = ParquetBatches.__new__(ParquetBatches)
    copy.__dict__.update(dataset.__dict__)
    copy.world = (2, rank)
    return copy


class OneProcessData(RankerDataModule):
    """Its ``set_epoch`` sets the pair's shared epoch counter (the copies share it)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GlobalBatches(self.dataset("train")), batch_size=None)


def main() -> None:
    mode, model, log, out, epochs = sys.argv[1:6]
    resume = sys.argv[6] if len(sys.argv) > 6 else None
    data_class = OneProcessData if mode == "one" else RankerDataModule
    data = data_class(
        str(ROOT / "configs" / "data" / "synthetic.yaml"),
        log_path=log,
        batch_size=256,
        eval_batch_size=1024,
    )
    torch.manual_seed(0)
    module = Recording(
        lambda inputs, tasks: build(NETWORKS[model], inputs, tasks),
        inputs=data.input_spec,
        tasks=data.tasks,
        embedding_optimizer="rowwise_adagrad",
        id_dropout={},
        # MMoE's items learn at their own rate: the sharded tables' rates against the replicated
        # run's ``RowRates``. HoME and AW-MoE amplify rounding (BatchNorm per rank, a sharp
        # contrastive loss), so there every row takes the optimiser's own step on both paths.
        catalogue_learning_rate=None,
        feature_learning_rates={"item_id": 0.01} if model == "mmoe" else None,
        sharding="torchrec" if mode == "sharded" else "none",
    )
    ddp = mode != "one"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_epochs=int(epochs),
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    losses = torch.tensor(module.losses)
    if ddp:
        dist.all_reduce(losses)
        losses /= 2
    trainer.save_checkpoint(f"{out}.ckpt")
    if trainer.global_rank == 0:
        result = {"losses": losses.tolist(), "val": module.last_metrics["val"]}
        Path(f"{out}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
