"""ranker against torch-rechub's MMoE on the same transformed training rows, same sizes.

    pip install --target <dir> --no-deps torch-rechub==0.9.0
    PYTHONPATH=<dir> python benchmarks/vs_rechub.py --log <generated log> [--rounds 2]

The rows are the generated log's training split transformed by ranker's FeatureState (the
dataset config without its sequence feature: torch-rechub's MMoE takes none), held in memory
as batches of ``--batch-size``. Both models: MMoE, 8 experts [256, 128], towers [64], every
categorical input embedded in 16 dimensions, the numeric inputs as they are, 8 tasks.

- **torch-rechub**: ``MTLTrainer.train_one_epoch`` (its own loop: Adam over all parameters,
  the embedding tables included, dense) over the batches as its dict input.
- **ranker step**: ``RankerModule``'s training step (``benchmarks/train_step.py``: AdamW on
  the dense part, SparseAdam on the rows the batch touches) over the same batches.
- **ranker fit**: ``ranker fit``'s own ``train/samples_per_sec``, one epoch streamed from the
  Parquet log (the data path included).

Timed in alternating rounds; prints samples/s per round and the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.train_step import build_module, step  # noqa: E402
from benchmarks.zoo import without_sequences  # noqa: E402
from features.datamodule import RankerDataModule  # noqa: E402


def rechub_model(data: RankerDataModule):
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE

    spec = data.input_spec
    features = [
        SparseFeature(name, vocab_size=cardinality, embed_dim=16)
        for name, cardinality in zip(spec.cat_names, spec.cardinalities, strict=True)
    ] + [DenseFeature(name) for name in spec.num_names]
    tasks = len(data.tasks)
    return MMOE(
        features,
        ["classification"] * tasks,
        n_expert=8,
        expert_params={"dims": [256, 128]},
        tower_params_list=[{"dims": [64]}] * tasks,
    )


def rechub_epoch(data: RankerDataModule, batches: list) -> float:
    from torch_rechub.trainers import MTLTrainer

    torch.manual_seed(0)
    model = rechub_model(data)
    spec = data.input_spec
    inputs = [
        (
            {
                **{n: b.cat[:, i] for i, n in enumerate(spec.cat_names)},
                **{n: b.num[:, i] for i, n in enumerate(spec.num_names)},
            },
            b.labels,
        )
        for b in batches
    ]
    with tempfile.TemporaryDirectory() as work:
        trainer = MTLTrainer(
            model, ["classification"] * len(data.tasks), n_epoch=1, device="cpu", model_path=work
        )
        start = time.perf_counter()
        trainer.train_one_epoch(inputs)
        return sum(len(b) for b in batches) / (time.perf_counter() - start)


def ranker_epoch(data: RankerDataModule, batches: list) -> float:
    module = build_module("mmoe", data).train()
    optimizers = module.configure_optimizers()
    optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
    start = time.perf_counter()
    for batch in batches:
        step(module, optimizers, batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def ranker_fit(dataset: Path, log: Path, batch_size: int) -> float:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as work:
        uri = f"sqlite:///{work}/mlflow.db"
        subprocess.run(
            [str(Path(sys.executable).parent / "ranker"), "fit",
             "--config", str(ROOT / "configs" / "trainer.yaml"),
             "--config", str(ROOT / "configs" / "model" / "mmoe.yaml"),
             "--data.dataset", str(dataset), "--data.log_path", str(log),
             "--data.batch_size", str(batch_size), "--trainer.max_epochs", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.tracking_uri",
             uri],
            check=True, capture_output=True, cwd=work,
        )  # fmt: skip
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])
        return run.data.metrics["train/samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, default=ROOT / "configs/data/synthetic.yaml")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        dataset = without_sequences(args.dataset, Path(scratch))
        data = RankerDataModule(str(dataset), log_path=str(args.log), batch_size=args.batch_size)
        batches = list(data.train_dataloader())
        rows = sum(len(b) for b in batches)
        print(f"{rows:,} training rows, {len(batches)} batches of {args.batch_size}; "
              f"{sum(data.input_spec.cardinalities):,} embedding rows", flush=True)  # fmt: skip
        results: dict[str, list[float]] = {"torch-rechub": [], "ranker step": [], "ranker fit": []}
        for _ in range(args.rounds):
            results["torch-rechub"].append(rechub_epoch(data, batches))
            results["ranker step"].append(ranker_epoch(data, batches))
            results["ranker fit"].append(ranker_fit(dataset, args.log, args.batch_size))
            print({k: round(v[-1]) for k, v in results.items()}, flush=True)
    print("\n| | samples/s per round | vs torch-rechub (same round) |\n|---|---|---|")
    for name, values in results.items():
        ratios = [v / r for v, r in zip(values, results["torch-rechub"], strict=True)]
        print(
            f"| {name} | {' / '.join(f'{v:,.0f}' for v in values)} | "
            f"{' / '.join(f'{r:.2f}x' for r in ratios)} |"
        )


if __name__ == "__main__":
    main()
