"""Checkpoint selection that cannot silently fail, and early stopping, on real fits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from pipelines.commands import main
from ranker.models import MMoE
from ranker.module import RankerModule
from tests.pipelines.test_fit_e2e import fit_args
from tests.ranker.common import INPUTS, TASKS


@pytest.fixture(scope="module")
def one_row_per_user(tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny log with a user of its own on every row: GAUC is undefined everywhere."""
    out = tmp_path_factory.mktemp("one_row_per_user")
    for file in sorted(tiny_log.rglob("*.parquet")):
        frame = pl.read_parquet(file, hive_partitioning=False)
        offset = abs(hash(file.parent.name)) % 10**9 * 10**5
        frame = frame.with_columns((pl.int_range(pl.len()) + offset).alias("user_id"))
        target = out / file.relative_to(tiny_log)
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(target, row_group_size=1_000)
    return out


def run_of(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ranker")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_without_user_groups_the_best_auc_epoch_is_kept(
    one_row_per_user: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.warns(UserWarning, match="val mean GAUC is undefined on this data"):
        main(
            fit_args(
                one_row_per_user,
                tmp_path / "checkpoints",
                "--trainer.max_epochs",
                "4",
                "--trainer.logger.init_args.tracking_uri",
                uri,
                "--trainer.enable_progress_bar",
                "false",
                "--model.learning_rate",
                "0.003",
            )
        )
    client, run = run_of(uri)
    assert run.data.params["selection/metric"] == "val/auc/mean"
    gauc = client.get_metric_history(run.info.run_id, "val/gauc/mean")
    assert all(math.isnan(m.value) for m in gauc)
    monitor = sorted(
        client.get_metric_history(run.info.run_id, "val/monitor"), key=lambda m: m.step
    )
    auc = sorted(client.get_metric_history(run.info.run_id, "val/auc/mean"), key=lambda m: m.step)
    assert [m.value for m in monitor] == [m.value for m in auc][: len(monitor)]
    best = int(np.argmax([m.value for m in monitor]))
    assert best > 0  # on this data the first epoch is not the best: the old selection kept it
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert f"best-{best}" in checkpoints, checkpoints
    assert f"checkpoint chosen on val mean AUC (best: best-{best}.ckpt)" in capsys.readouterr().out


def test_early_stopping_ends_training_before_max_epochs(
    one_row_per_user: Path, tmp_path: Path
) -> None:
    """Labels shuffled against the features: nothing to learn, val stops improving."""
    log = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for file in sorted(one_row_per_user.rglob("*.parquet")):
        frame = pl.read_parquet(file, hive_partitioning=False)
        labels = [c for c in frame.columns if c in ("click", "like", "long_view")]
        frame = frame.with_columns(pl.col(c).shuffle(int(rng.integers(1 << 30))) for c in labels)
        target = log / file.relative_to(one_row_per_user)
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(target, row_group_size=1_000)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(
        fit_args(
            log,
            tmp_path / "checkpoints",
            "--trainer.max_epochs",
            "30",
            "--trainer.logger.init_args.tracking_uri",
            uri,
            "--trainer.enable_progress_bar",
            "false",
            "--model.learning_rate",
            "0.01",
            "--data.batch_size",
            "4096",
        )
    )
    client, run = run_of(uri)
    epochs = len(client.get_metric_history(run.info.run_id, "val/monitor"))
    assert 3 <= epochs < 30  # patience 2: at least three validations, far fewer than 30


DEFINED = {"gauc/mean": 0.61, "auc/mean": 0.7, "logloss/mean": 0.3}
NO_GAUC = {**DEFINED, "gauc/mean": math.nan}
ONLY_LOGLOSS = {**NO_GAUC, "auc/mean": math.nan}


@pytest.mark.parametrize(
    ("monitor", "metrics", "chosen", "value", "warns"),
    [
        ("auto", DEFINED, "gauc", 0.61, False),
        ("auto", NO_GAUC, "auc", 0.7, True),
        ("auc", DEFINED, "auc", 0.7, False),
        ("logloss", DEFINED, "logloss", -0.3, False),
        ("gauc", ONLY_LOGLOSS, "logloss", -0.3, True),
    ],
)
def test_the_monitored_metric_falls_back_loudly(monitor, metrics, chosen, value, warns) -> None:
    module = RankerModule(lambda i, t: MMoE(i, t), inputs=INPUTS, tasks=TASKS, monitor=monitor)

    class Trainer:
        sanity_checking = False
        logger = None

    module._trainer = Trainer()  # what _monitored reads of the trainer
    if warns:
        with pytest.warns(UserWarning, match=f"mean {chosen.upper()} instead"):
            got = module._monitored(metrics)
    else:
        got = module._monitored(metrics)
    assert module.selected == chosen and got == pytest.approx(value)
    # Chosen once: a later epoch where it is undefined is no best, not a switch of metric.
    later = {k: math.nan for k in metrics}
    with pytest.warns(UserWarning, match="is NaN this epoch"):
        assert module._monitored(later) == -math.inf
    assert module.selected == chosen


def test_plateau_schedule_pcgrad_adagrad_tower_and_id_dropout_train(
    tiny_log: Path, tmp_path: Path
) -> None:
    """The training options of the tuner's search space, on a real fit: each learning rate
    halves exactly after a validation that did not beat the best; PCGrad logs its conflicts."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(
        fit_args(
            tiny_log,
            tmp_path / "checkpoints",
            "--trainer.max_epochs",
            "5",
            "--trainer.callbacks",
            "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
            "{monitor: val/monitor, mode: max, save_top_k: 1}}]",
            "--trainer.logger.init_args.tracking_uri",
            uri,
            "--trainer.enable_progress_bar",
            "false",
            "--model.learning_rate",
            "0.01",
            "--model.lr_schedule",
            "plateau",
            "--model.loss_weighting",
            "pcgrad",
            "--model.embedding_optimizer",
            "adagrad",
            "--model.network.init_args.tower_dropout",
            "0.1",
            "--model.id_dropout",
            "{item_id: 0.1, author_id: 0.05}",
        )
    )
    client, run = run_of(uri)

    def history(key: str) -> list[float]:
        metrics = client.get_metric_history(run.info.run_id, key)
        return [m.value for m in sorted(metrics, key=lambda m: m.step)]

    monitor, lr, embedding_lr = (
        history("val/monitor"),
        history("train/lr"),
        history("train/embedding_lr"),
    )
    assert len(lr) == 5 and len(monitor) == 6  # the last: the best checkpoint, validated again
    expected, best = [0.01], -math.inf
    for value in monitor[:4]:
        expected.append(expected[-1] * (1.0 if value > best else 0.5))
        best = max(best, value)
    assert lr == pytest.approx(expected)
    assert embedding_lr == pytest.approx([0.05 * e / 0.01 for e in expected])
    assert min(lr) < 0.01  # this seed's run did have a plateau
    conflicts = history("train/pcgrad/conflicts_epoch")
    assert len(conflicts) == 5 and all(0.0 <= c <= 1.0 for c in conflicts)
