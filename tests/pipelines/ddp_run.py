"""One seeded MMoE on a log, in one process or under torchrun (DDP, gloo).

    python tests/pipelines/ddp_run.py validate <log> <out> <loader workers> [<dataset config>]
    torchrun --nproc_per_node 2 tests/pipelines/ddp_run.py <validate|train> <log> <out> <workers>

The dataset config is the generated log's unless given (then ``<log>`` may be ``-``: the
config's own; uplift data makes the MMoE an S-learner).

validate: rank 0 writes the untrained model's validation metrics (with count/<task>: the rows
scored) to ``out`` (JSON). train: one epoch; every rank writes the fingerprints of the rows it
trained on, batch by batch, to ``out.<rank>.npz``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from features.datamodule import RankerDataModule, TensorBatch  # noqa: E402
from ranker.models import build  # noqa: E402
from ranker.module import RankerModule  # noqa: E402

NETWORK = {
    "class_path": "ranker.models.MMoE",
    "init_args": {"num_experts": 3, "expert_hidden": [16]},
}


def fingerprints(cat: torch.Tensor) -> np.ndarray:
    """One int per row (its categorical ids hashed), to compare multisets of rows."""
    return pl.DataFrame(cat.numpy()).hash_rows(seed=1).to_numpy()


class Recording(RankerModule):
    """Trains as usual and keeps what each training batch held."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[np.ndarray] = []

    def training_step(self, batch: TensorBatch, batch_idx: int) -> torch.Tensor:
        self.seen.append(fingerprints(batch.cat))
        return super().training_step(batch, batch_idx)


def main() -> None:
    mode, log, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    config = sys.argv[5] if len(sys.argv) > 5 else str(ROOT / "configs" / "data" / "synthetic.yaml")
    data = RankerDataModule(
        config,
        log_path=None if log == "-" else log,
        batch_size=512,
        eval_batch_size=512,
        num_workers=workers,
    )
    torch.manual_seed(0)
    module = Recording(
        lambda inputs, tasks: build(NETWORK, inputs, tasks),
        inputs=data.input_spec,
        tasks=data.tasks,
    )
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_epochs=1,
        limit_val_batches=0 if mode == "train" else None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    if mode == "train":
        trainer.fit(module, datamodule=data)
        np.savez(f"{out}.{trainer.global_rank}.npz", *module.seen)
        return
    trainer.validate(module, datamodule=data, verbose=False)
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(module.last_metrics["val"]))


if __name__ == "__main__":
    main()
