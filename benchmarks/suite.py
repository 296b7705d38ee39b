"""Our defaults beside the peers, on every suite dataset: one table of test mean AUC / GAUC.

    python benchmarks/suite.py                                  # every dataset, the whole zoo
    python benchmarks/suite.py --datasets kuairand hillstrom --models home mmoe --seeds 0 1 2
    python benchmarks/suite.py ... --home-checkout <path>       # + the public HoME and its PLE
    PYTHONPATH=<dir> python benchmarks/suite.py ...             # + torch-rechub's MMoE and PLE
    python benchmarks/suite.py ... --table-only                 # re-print from MLflow
    python benchmarks/suite.py --prepare hillstrom              # only write the prepared data

torch-rechub: ``pip install --target <dir> --no-deps torch-rechub==0.9.0``. The public HoME
(github.com/ACyberSpace/HoME-Hierarchy-of-Multi-Gate-Experts-for-Multi-Task-Learning-at-Kuaishou,
measured at e78433e) has no licence: its code is imported from the checkout you give, never
copied here.

**Ours** is ``ranker fit`` with the defaults (``configs/trainer.yaml`` + the model's config,
nothing else but the budget: epochs, batch size, seed), run by ``benchmarks/zoo.py``'s
``train``; the figures are the best-validation checkpoint's test metrics, as ``ranker fit``
logs them.

**The peers** train in this process on the same transformed tensors (``RankerDataModule``'s
batches, the sequence features left out: they take none), the same budget and seeds, each
with its own recipe (``PEERS``); the epoch kept is the one with the best validation mean GAUC
(mean AUC where GAUC is undefined), the same rule as ours, and its test split is scored by
``ranker.metrics.task_metrics``. Every result is an MLflow run in the experiment
``suite-<dataset>`` named ``<model>-s<seed>``; a finished run is reused (``--retrain`` to run
it again), so an interrupted suite resumes. ``--no-sequences`` trains ours without the
sequence features (an ablation row, ``<model>-noseq``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from rich.table import Table
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.zoo import ZOO, cell, label, markdown, train, without_sequences  # noqa: E402
from features.config import DatasetConfig  # noqa: E402
from features.datamodule import RankerDataModule, TensorBatch  # noqa: E402
from features.synth import Exposure, generate  # noqa: E402
from features.synth_uplift import split_within  # noqa: E402
from pipelines.report import wide_console  # noqa: E402
from pipelines.tracking import resolve_tracking_uri  # noqa: E402
from ranker.metrics import task_metrics  # noqa: E402
from ranker.module import choose_monitor, signed  # noqa: E402

HILLSTROM = ROOT.parent / "shared" / "data" / "hillstrom" / "hillstrom.parquet"


# -- the datasets ------------------------------------------------------------------------------


def prepare_hillstrom(out: Path, source: Path = HILLSTROM, seed: int = 0) -> None:
    """The shared Hillstrom rows unchanged, plus ``customer`` (the row number), ``split``:
    80 / 10 / 10 at random within each arm (``segment``), and ``uplift_split``: 50 / 25 / 25
    within each arm (the uplift benchmark's, as its peers were measured), fixed seeds."""
    frame = pl.read_parquet(source).with_row_index("customer")
    arms = frame["segment"].to_numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.with_columns(
        pl.Series("split", split_within(arms, (0.8, 0.9), np.random.default_rng(seed))),
        pl.Series("uplift_split", split_within(arms, (0.5, 0.75), np.random.default_rng(seed))),
    ).write_parquet(out)


@dataclass(frozen=True)
class SuiteDataset:
    """A dataset of the suite: its config, its log (``None``: the config's own path) and how
    to make the log when it is missing, and the training budget every model gets on it."""

    config: Path
    epochs: int
    batch_size: int
    log: Path | None = None
    make: Callable[[Path], object] | None = None

    def ready(self) -> None:
        target = self.log or DatasetConfig.from_yaml(self.config).path
        if self.make is not None and not Path(target).exists():
            print(f"writing {target} ...", flush=True)
            self.make(Path(target))


DATA = ROOT / "data" / "suite"


def generated(directory: str, **log: Any) -> SuiteDataset:
    """A generated log under ``DATA``: ``generate(**log)`` read by the synthetic config, 2
    epochs at batch 2,048."""
    return SuiteDataset(
        ROOT / "configs/data/synthetic.yaml",
        epochs=2,
        batch_size=2048,
        log=DATA / directory,
        make=lambda out: generate(out, **log),
    )


DATASETS: dict[str, SuiteDataset] = {
    # Real: KuaiRand as shipped (with its history feature), Hillstrom (one row per customer).
    "kuairand": SuiteDataset(ROOT / "configs/data/kuairand.yaml", epochs=5, batch_size=512),
    "hillstrom": SuiteDataset(
        ROOT / "configs/data/hillstrom.yaml", epochs=5, batch_size=512, make=prepare_hillstrom
    ),
    # Generated: the demo's log, and 1M rows with large vocabularies where 30% of the items
    # (and authors) are released during the log.
    "demo": generated("demo", rows=200_000),
    "new_items": generated(
        "new_items_1m",
        rows=1_000_000,
        users=100_000,
        items=500_000,
        authors=50_000,
        new_items=0.3,
    ),
    # Held out: no default was chosen on it. The other regime: frequent ids (100 rows per user,
    # 30 per item), items shown by popularity alone (no retrieval by interest, no daily
    # swing), another seed.
    "held_out": generated(
        "held_out",
        rows=300_000,
        users=3_000,
        items=10_000,
        authors=1_000,
        seed=11,
        exposure=Exposure(),
        swing=0.0,
    ),
    # Held out too, for the catalogue rate's rule: the demo's shape, but 30% of the items (and
    # authors) released during the log, another seed: does the rule read the renewal right?
    "renewing": generated("renewing", rows=200_000, seed=12, new_items=0.3),
}


# -- the peers ---------------------------------------------------------------------------------


def rechub_features(spec):
    from torch_rechub.basic.features import DenseFeature, SparseFeature

    """One width for every categorical feature (its layer concatenates them on one axis): the
    widest of ours."""
    dim = max(spec.embedding_dims)
    sizes = zip(spec.cat_names, spec.cardinalities, strict=True)
    sparse = [SparseFeature(name, vocab_size=rows, embed_dim=dim) for name, rows in sizes]
    return sparse + [DenseFeature(name) for name in spec.num_names]


class RechubNet(nn.Module):
    """A torch-rechub multi-task model on our batches: its dict input, its probabilities."""

    def __init__(self, model: nn.Module, spec) -> None:
        super().__init__()
        self.model, self.cat_names, self.num_names = model, spec.cat_names, spec.num_names

    def forward(self, batch: TensorBatch) -> torch.Tensor:
        x = {n: batch.cat[:, i] for i, n in enumerate(self.cat_names)}
        x |= {n: batch.num[:, i] for i, n in enumerate(self.num_names)}
        return self.model(x)


def rechub_mmoe(data: RankerDataModule) -> nn.Module:
    """torch-rechub 0.9 MMOE at our MMoE's sizes: 8 experts [256, 128], towers [64]."""
    from torch_rechub.models.multi_task import MMOE

    tasks = len(data.tasks)
    model = MMOE(
        rechub_features(data.input_spec),
        ["classification"] * tasks,
        n_expert=8,
        expert_params={"dims": [256, 128]},
        tower_params_list=[{"dims": [64]}] * tasks,
    )
    return RechubNet(model, data.input_spec)


def rechub_ple(data: RankerDataModule) -> nn.Module:
    """torch-rechub 0.9 PLE at our PLE's sizes: 2 levels, 1 task + 2 shared experts
    [256, 128] per level, towers [64]."""
    from torch_rechub.models.multi_task import PLE

    tasks = len(data.tasks)
    model = PLE(
        rechub_features(data.input_spec),
        ["classification"] * tasks,
        n_level=2,
        n_expert_specific=1,
        n_expert_shared=2,
        expert_params={"dims": [256, 128]},
        tower_params_list=[{"dims": [64]}] * tasks,
    )
    return RechubNet(model, data.input_spec)


def task_names(data: RankerDataModule) -> list[str]:
    return [t.name for t in data.tasks]


def public_groups(data: RankerDataModule) -> dict[str, list[str]]:
    """The public HoME's two task categories (``watch``, ``interact``): the tasks of our
    first task group, then all the others (with one group: its first task, then the rest)."""
    names, groups = task_names(data), [t.group for t in data.tasks]
    first = [n for n, g in zip(names, groups, strict=True) if g == groups[0]]
    if len(first) == len(names):
        first = names[:1]
    return {"watch": first, "interact": [n for n in names if n not in first]}


class PublicEmbedding(nn.Module):
    """The public code's input: one ``nn.Embedding`` per categorical column (its
    ``FeatureEmbedding``), our numeric inputs appended as they are."""

    def __init__(self, spec) -> None:
        super().__init__()
        from ranking.models.embedding import FeatureEmbedding

        dims = zip(spec.cat_names, spec.cardinalities, spec.embedding_dims, strict=True)
        self.table = FeatureEmbedding({n: (rows, dim) for n, rows, dim in dims})
        self.total_dim = self.table.total_dim + len(spec.num_names)
        self.num: torch.Tensor | None = None

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.table(features), self.num], dim=1)


class PublicNet(nn.Module):
    """The public HoME (or its PLE) on our batches, with its uncertainty loss."""

    def __init__(self, data: RankerDataModule, kind: str) -> None:
        super().__init__()
        from ranking.models import PLE, HoME

        # Task names prefixed: its towers are a ModuleDict, where ``forward`` cannot be a key.
        spec, names = data.input_spec, [f"task_{n}" for n in task_names(data)]
        self.embedding = PublicEmbedding(spec)
        self.cat_names, self.names = spec.cat_names, names
        self.groups = {k: [f"task_{n}" for n in v] for k, v in public_groups(data).items()}
        dim = self.embedding.total_dim
        if kind == "home":  # its ModelConfig defaults
            self.model = HoME(
                user_dim=dim, item_dim=0, expert_dim=256, tower_dims=[128, 64],
                num_meta_shared_experts=4, num_meta_category_experts=2,
                num_task_shared_experts=2, num_task_in_category_experts=2,
                num_task_specific_experts=1, lora_dim=64, num_lora=2,
                task_groups=self.groups, all_tasks=names,
            )  # fmt: skip
        else:  # its main.py's PLE
            self.model = PLE(
                input_dim=dim, all_tasks=names, ple_level_nums=1, task_expert_num=4,
                shared_expert_num=2, task_expert_dnn_units=[128, 64],
                shared_expert_dnn_units=[128, 64], task_gate_dnn_units=[128, 64],
                shared_gate_dnn_units=[128, 64], task_tower_dnn_units=[128, 64],
            )  # fmt: skip
        self.criterion: nn.Module | None = None

    def use_loss(self, positive_rates: np.ndarray) -> None:
        """Its default loss (``HoMEUncertaintyLoss``); its sparse tasks, by the rate of the
        tasks it lists on KuaiRand: a positive rate under 5%."""
        from ranking.models.loss import HoMEUncertaintyLoss

        sparse = [n for n, r in zip(self.names, positive_rates, strict=True) if r < 0.05]
        self.criterion = HoMEUncertaintyLoss(self.names, self.groups, sparse)

    def forward(self, batch: TensorBatch) -> torch.Tensor:
        features = {n: batch.cat[:, i] for i, n in enumerate(self.cat_names)}
        self.embedding.num = batch.num
        out = self.model(features, {}, self.embedding, None, None)
        return torch.stack([out[n] for n in self.names], dim=1)

    def loss(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        predictions = {n: probs[:, j] for j, n in enumerate(self.names)}
        return self.criterion(predictions, {n: labels[:, j] for j, n in enumerate(self.names)})[
            "total_loss"
        ]


@dataclass(frozen=True)
class Peer:
    """A peer and its own recipe: Adam at ``lr`` with ``weight_decay`` on every parameter
    (the embedding tables included), gradient clipping, a plateau schedule on validation."""

    build: Callable[[RankerDataModule], nn.Module]
    needs: str  # "rechub" or "public"
    weight_decay: float = 1e-5
    clip: float = 0.0
    plateau_patience: int | None = None


PEERS: dict[str, Peer] = {
    # MTLTrainer's defaults: Adam(lr 1e-3, weight_decay 1e-5), no clipping, no schedule.
    "rechub_mmoe": Peer(rechub_mmoe, "rechub"),
    "rechub_ple": Peer(rechub_ple, "rechub"),
    # Its TrainConfig: Adam(1e-3, 1e-5), clip 5, ReduceLROnPlateau(max, 0.5, patience 2).
    "public_home": Peer(lambda d: PublicNet(d, "home"), "public", clip=5.0, plateau_patience=2),
    "public_ple": Peer(lambda d: PublicNet(d, "ple"), "public", clip=5.0, plateau_patience=2),
}


def available_peers(checkout: Path | None) -> list[str]:
    """The peers this machine can run: torch-rechub importable, the public checkout given."""
    found = []
    if importlib.util.find_spec("torch_rechub") is not None:
        found += [p for p, peer in PEERS.items() if peer.needs == "rechub"]
    if checkout is not None:
        if not (checkout / "ranking" / "models" / "home.py").is_file():
            sys.exit(f"--home-checkout {checkout}: no ranking/models/home.py there")
        sys.path.insert(0, str(checkout))
        found += [p for p, peer in PEERS.items() if peer.needs == "public"]
    return found


# -- training a peer ---------------------------------------------------------------------------


def masked_bce(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of each task's BCE over its observed rows (NaN = unobserved)."""
    seen = ~torch.isnan(labels)
    losses = [
        F.binary_cross_entropy(probs[seen[:, j], j].clamp(1e-7, 1 - 1e-7), labels[seen[:, j], j])
        for j in range(labels.shape[1])
        if seen[:, j].any()
    ]
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(net: nn.Module, data: RankerDataModule, split: str) -> dict[str, float]:
    net.eval()
    loader = data.val_dataloader() if split == "val" else data.test_dataloader()
    probs, labels, users = [], [], []
    for batch in loader:
        probs.append(net(batch))
        labels.append(batch.labels)
        users.append(batch.users)
    cat = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return task_metrics(cat(probs), cat(labels), torch.cat(users).numpy(), task_names(data))


def positive_rates(data: RankerDataModule) -> np.ndarray:
    labels = torch.cat([b.labels for b in data.train_dataloader()])
    return torch.nanmean(labels, 0).numpy()


def train_peer(name: str, data: RankerDataModule, epochs: int, seed: int) -> dict[str, float]:
    """Trains peer ``name`` with its recipe; the best-validation epoch's test metrics, plus
    ``epoch_seconds`` and ``params``."""
    peer = PEERS[name]
    torch.manual_seed(seed)
    net = peer.build(data)
    if isinstance(net, PublicNet):
        net.use_loss(positive_rates(data))
    loss_of = net.loss if isinstance(net, PublicNet) else masked_bce
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-3, weight_decay=peer.weight_decay)
    schedule = None
    if peer.plateau_patience is not None:
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimiser, mode="max", factor=0.5, patience=peer.plateau_patience
        )
    best, best_state, seconds, chosen = -math.inf, None, [], None
    for epoch in range(epochs):
        data.set_epoch(epoch)
        net.train()
        start = time.perf_counter()
        for batch in data.train_dataloader():
            loss = loss_of(net(batch), batch.labels)
            optimiser.zero_grad()
            loss.backward()
            if peer.clip:
                torch.nn.utils.clip_grad_norm_(params, peer.clip)
            optimiser.step()
        seconds.append(time.perf_counter() - start)
        metrics = evaluate(net, data, "val")
        chosen = chosen or choose_monitor("auto", metrics)  # ours: chosen once, then kept
        value = signed(chosen, metrics)
        if schedule is not None:
            schedule.step(value)
        if best_state is None or value > best:  # a NaN epoch is never a best, unless first
            best, best_state = value, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    metrics = evaluate(net, data, "test")
    n_params = sum(p.numel() for p in net.parameters())
    return {**metrics, "epoch_seconds": float(np.mean(seconds)), "params": float(n_params)}


# -- running and reading -----------------------------------------------------------------------


def finished_runs(client: MlflowClient, experiment: str) -> dict[str, object]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'")
    return {r.info.run_name: r for r in runs}


def run_ours(name: str, dataset: SuiteDataset, args: argparse.Namespace) -> None:
    experiment = f"suite-{name}"
    done = finished_runs(MlflowClient(resolve_tracking_uri()), experiment)
    with tempfile.TemporaryDirectory() as scratch:
        config = dataset.config
        if args.no_sequences:
            config = without_sequences(config, Path(scratch))
        for model in args.models:
            for seed in args.seeds:
                if f"{label(model, args)}-s{seed}" in done and not args.retrain:
                    continue
                train(model, seed, argparse.Namespace(
                    fit_args=args.fit_args, train_dataset=config, log=dataset.log,
                    batch_size=dataset.batch_size, epochs=args.epochs or dataset.epochs,
                    experiment=experiment, variant=args.variant,
                    no_sequences=args.no_sequences, checkpoints=args.checkpoints,
                ))  # fmt: skip


def run_peers(name: str, dataset: SuiteDataset, peers: list[str], args: argparse.Namespace) -> None:
    client = MlflowClient(resolve_tracking_uri())
    experiment = f"suite-{name}"
    done = finished_runs(client, experiment)
    todo = [(p, s) for p in peers for s in args.seeds if f"{p}-s{s}" not in done or args.retrain]
    if not todo:
        return
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    with tempfile.TemporaryDirectory() as scratch:
        config = without_sequences(dataset.config, Path(scratch))
        log = str(dataset.log) if dataset.log else None
        data = RankerDataModule(str(config), log_path=log, batch_size=dataset.batch_size)
        for peer, seed in todo:
            start = time.perf_counter()
            metrics = train_peer(peer, data, args.epochs or dataset.epochs, seed)
            run = client.create_run(experiment_id, run_name=f"{peer}-s{seed}")
            for key, value in metrics.items():
                if isinstance(value, float) and math.isfinite(value):
                    client.log_metric(run.info.run_id, f"test/{key}", value)
            client.set_terminated(run.info.run_id)
            print(f"{peer:22s} seed {seed}: {time.perf_counter() - start:7.1f} s", flush=True)


def epoch_seconds(client: MlflowClient, run) -> float:
    if "test/epoch_seconds" in run.data.metrics:  # a peer
        return run.data.metrics["test/epoch_seconds"]
    history = client.get_metric_history(run.info.run_id, "train/epoch_seconds")
    return float(np.mean([m.value for m in history])) if history else math.nan


def table(names: list[str], rows: list[str], args: argparse.Namespace) -> Table:
    client = MlflowClient(resolve_tracking_uri())
    out = Table(title=f"test mean AUC / GAUC, best validation epoch, seeds {args.seeds}")
    out.add_column("model")
    for name in names:
        out.add_column(f"{name} AUC", justify="right")
        out.add_column(f"{name} GAUC", justify="right")
        out.add_column(f"{name} s/epoch", justify="right")
    runs_of = {name: finished_runs(client, f"suite-{name}") for name in names}
    for model in rows:
        cells = []
        for name in names:
            runs = runs_of[name]
            mine = [runs[f"{model}-s{s}"] for s in args.seeds if f"{model}-s{s}" in runs]
            seconds = [epoch_seconds(client, r) for r in mine]
            for key in ("test/auc/mean", "test/gauc/mean"):
                cells.append(cell([r.data.metrics.get(key, math.nan) for r in mine]))
            cells.append(f"{np.nanmean(seconds):.1f}" if mine else "-")
        if any(c != "-" for c in cells):
            out.add_row(model, *cells)
    return out


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=ZOO, help="our zoo models (defaults)")
    parser.add_argument("--peers", nargs="*", default=None, help="default: every one found")
    parser.add_argument("--home-checkout", type=Path, help="a checkout of the public HoME")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=0, help="0: each dataset's own budget")
    parser.add_argument("--fit-args", default="", help="more `ranker fit` flags (ours only)")
    parser.add_argument("--variant", default="", help="our runs named <model>+<variant>")
    parser.add_argument(
        "--no-sequences", action="store_true",
        help="ours without the sequence features (as the peers take them), for an ablation row",
    )  # fmt: skip
    parser.add_argument("--also", nargs="*", default=[], help="more rows: runs named so")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--retrain", action="store_true", help="train again what was run")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--prepare", nargs="+", choices=list(DATASETS), help="only write data")
    args = parser.parse_args()
    if args.prepare:
        for name in args.prepare:
            DATASETS[name].ready()
        return
    found = available_peers(args.home_checkout)
    peers = found if args.peers is None else args.peers
    missing = [p for p in peers if p not in found]
    if missing:
        sys.exit(f"peers {missing} cannot run here (torch-rechub importable? --home-checkout?)")
    print(machine(), flush=True)
    for name in args.datasets:
        dataset = DATASETS[name]
        if not args.table_only:
            dataset.ready()
            run_ours(name, dataset, args)
            run_peers(name, dataset, peers, args)
    rows = [*(label(m, args) for m in args.models), *args.also, *PEERS]
    result = table(args.datasets, rows, args)
    wide_console().print(result)
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
