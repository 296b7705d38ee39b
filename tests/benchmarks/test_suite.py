"""The benchmark suite end to end on tiny data: our default run, a peer's loop, the table."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

from benchmarks import suite
from features.config import DatasetConfig
from features.datamodule import RankerDataModule, TensorBatch
from tests.conftest import SYNTHETIC_CONFIG


class LogisticPeer(nn.Module):
    """A stand-in peer (torch-rechub is not installed in the test environment): logistic
    regression over one embedding per categorical column and the numeric inputs."""

    def __init__(self, data: RankerDataModule) -> None:
        super().__init__()
        spec = data.input_spec
        self.tables = nn.ModuleList(nn.Embedding(n, 4) for n in spec.cardinalities)
        self.out = nn.Linear(4 * len(self.tables) + spec.num_numeric, len(data.tasks))

    def forward(self, batch: TensorBatch) -> torch.Tensor:
        x = [t(batch.cat[:, i]) for i, t in enumerate(self.tables)]
        return torch.sigmoid(self.out(torch.cat([*x, batch.num], dim=1)))


def suite_args(tmp_path: Path, **more: object) -> argparse.Namespace:
    """``suite.py``'s arguments for our MMoE, one seed, each dataset's own budget."""
    return argparse.Namespace(
        models=["mmoe"], seeds=[0], epochs=0, fit_args="", checkpoints=tmp_path / "ckpt",
        retrain=False, variant="", **more,
    )  # fmt: skip


def test_suite_runs_ours_and_a_peer_and_tables_both(
    tiny_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setitem(suite.PEERS, "logistic", suite.Peer(LogisticPeer, "test", clip=5.0))
    dataset = suite.SuiteDataset(SYNTHETIC_CONFIG, epochs=1, batch_size=1024, log=tiny_log)
    args = suite_args(tmp_path, no_sequences=False)
    suite.run_ours("tiny", dataset, args)
    suite.run_peers("tiny", dataset, ["logistic"], args)
    client = suite.MlflowClient(suite.resolve_tracking_uri())
    runs = suite.finished_runs(client, "suite-tiny")
    assert set(runs) == {"mmoe-s0", "logistic-s0"}
    assert runs["mmoe-s0"].data.params["data.dataset"] == str(SYNTHETIC_CONFIG)
    for run in runs.values():
        assert 0.5 < run.data.metrics["test/auc/mean"] < 1.0  # both learned something
        assert math.isfinite(run.data.metrics["test/gauc/mean"])
    # A finished run is reused, not trained again.
    suite.run_peers("tiny", dataset, ["logistic"], args)
    assert len(suite.finished_runs(client, "suite-tiny")) == 2
    table = suite.table(["tiny"], ["mmoe", "home", "logistic"], args)
    models = list(table.columns[0].cells)
    assert models == ["mmoe", "logistic"]  # home was not run: no row
    assert [c.header for c in table.columns[1:]] == ["tiny AUC", "tiny GAUC", "tiny s/epoch"]


def test_suite_trains_an_ablation_row_without_the_sequences(
    tiny_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    trained_on: list[DatasetConfig] = []
    real = suite.train

    def spy(model: str, seed: int, run_args: argparse.Namespace) -> None:
        trained_on.append(DatasetConfig.from_yaml(run_args.train_dataset))
        real(model, seed, run_args)

    monkeypatch.setattr(suite, "train", spy)
    dataset = suite.SuiteDataset(SYNTHETIC_CONFIG, epochs=1, batch_size=1024, log=tiny_log)
    args = suite_args(tmp_path, no_sequences=True)
    suite.run_ours("tiny", dataset, args)
    assert any(f.kind == "sequence" for f in DatasetConfig.from_yaml(SYNTHETIC_CONFIG).features)
    assert [f.name for f in trained_on[0].features if f.kind == "sequence"] == []
    assert len(trained_on[0].features) > 0
    client = suite.MlflowClient(suite.resolve_tracking_uri())
    run = suite.finished_runs(client, "suite-tiny")["mmoe-noseq-s0"]
    assert 0.5 < run.data.metrics["test/auc/mean"] < 1.0


def test_a_peer_keeps_its_best_validation_epoch(tiny_log: Path) -> None:
    data = RankerDataModule(str(SYNTHETIC_CONFIG), log_path=str(tiny_log), batch_size=1024)
    seen: list[float] = []
    real = suite.signed

    def spy(metric: str, metrics: dict[str, float]) -> float:
        seen.append(real(metric, metrics))
        return seen[-1]

    suite.PEERS["logistic"] = suite.Peer(LogisticPeer, "test", plateau_patience=0)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(suite, "signed", spy)
            metrics = suite.train_peer("logistic", data, epochs=2, seed=0)
    finally:
        del suite.PEERS["logistic"]
    assert len(seen) == 2 and metrics["params"] > 0 and metrics["epoch_seconds"] > 0
    assert 0.5 < metrics["auc/mean"] < 1.0


def test_hillstrom_is_prepared_whole_with_a_split_stratified_by_arm(tmp_path: Path) -> None:
    if not suite.HILLSTROM.is_file():
        pytest.skip("no ../shared/data/hillstrom")
    out = tmp_path / "hillstrom.parquet"
    suite.prepare_hillstrom(out)
    frame, source = pl.read_parquet(out), pl.read_parquet(suite.HILLSTROM)
    assert frame.drop("customer", "split", "uplift_split").equals(source)  # every row, in order
    assert frame["customer"].n_unique() == len(frame)
    shares = frame.group_by("segment").agg((pl.col("split") == "train").mean().alias("train"))
    assert shares["train"].is_between(0.799, 0.801).all()
    halves = frame.group_by("segment").agg((pl.col("uplift_split") == "train").mean())
    assert halves["uplift_split"].is_between(0.499, 0.501).all()  # the uplift benchmark's
    config = Path(tmp_path / "hillstrom.yaml")
    raw = suite.DATASETS["hillstrom"].config.read_text()
    config.write_text(raw.replace("../../data/hillstrom/hillstrom.parquet", str(out)))
    data = RankerDataModule(str(config), batch_size=4096)
    assert [t.name for t in data.tasks] == ["visit", "conversion"]
    assert sum(len(b) for b in data.test_dataloader()) == (frame["split"] == "test").sum()
    assert DatasetConfig.from_yaml(config).split.column == "split"


def test_the_public_home_gets_our_first_group_then_the_rest(tiny_log: Path) -> None:
    data = RankerDataModule(str(SYNTHETIC_CONFIG), log_path=str(tiny_log), batch_size=1024)
    groups = suite.public_groups(data)
    assert groups["watch"] == ["click", "effective_view", "long_view"]
    assert groups["interact"] == ["like", "comment", "forward", "follow", "collect"]
