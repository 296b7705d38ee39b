"""Validate one seeded, untrained MMoE on a log, in one process or under torchrun (DDP, gloo).

    python tests/pipelines/ddp_validate.py <log> <out.json> <loader workers>
    torchrun --nproc_per_node 2 tests/pipelines/ddp_validate.py <log> <out.json> <workers>

Rank 0 writes the validation metrics (with count/<task>: the rows scored) to ``out.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from features.datamodule import RankerDataModule  # noqa: E402
from ranker.models import build  # noqa: E402
from ranker.module import RankerModule  # noqa: E402

NETWORK = {
    "class_path": "ranker.models.MMoE",
    "init_args": {"num_experts": 3, "expert_hidden": [16]},
}


def main() -> None:
    log, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = str(ROOT / "configs" / "data" / "synthetic.yaml")
    data = RankerDataModule(config, log_path=log, eval_batch_size=512, num_workers=workers)
    torch.manual_seed(0)
    module = RankerModule(
        lambda inputs, tasks: build(NETWORK, inputs, tasks),
        inputs=data.input_spec,
        tasks=data.tasks,
    )
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(module.last_metrics["val"]))


if __name__ == "__main__":
    main()
