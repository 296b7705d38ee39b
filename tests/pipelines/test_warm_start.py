"""``ranker fit --warm_start``: vocabularies grow, known ids keep their rows, the optimiser
state and the lineage carry over, and a parent that does not fit is a clear error."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from features.config import FeatureSpec
from features.contract import OUTPUT
from features.datamodule import RankerDataModule
from features.state import CategoricalState, grown
from features.synth import Exposure, generate
from pipelines.checkpoints import locate, read_checkpoint
from pipelines.evaluate import compare
from pipelines.export.parity import parity_rows, torch_outputs
from pipelines.warm_start import TAG_PARENT_RUN, TAG_WARM_START, resolve, take_weights
from ranker.module import RankerModule
from tests.conftest import SYNTHETIC_CONFIG, fit


@dataclass
class Line:
    """A parent trained on days 1-5 of a log with new items every day, and the dataset of the
    next window (days 8-12)."""

    uri: str
    log: Path
    parent: str
    late: Path
    checkpoints: Path
    root: Path


def dataset(root: Path, log: Path, name: str, split: str, edit: tuple[str, str] = ("", "")) -> Path:
    text = SYNTHETIC_CONFIG.read_text().replace("path: ../../data/synthetic", f"path: {log}")
    days = "  train_end: 2024-01-12      # 12 days\n  val_end: 2024-01-13        # 1 day\n"
    days += "  test_end: 2024-01-14       # 1 day\n"
    assert days in text and edit[0] in text
    path = root / f"{name}.yaml"
    path.write_text(text.replace(days, split).replace(*edit))
    return path


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Line:
    root = tmp_path_factory.mktemp("warm")
    log = generate(
        root / "log", rows=20_000, users=400, items=1_000, authors=150, seed=3,
        rows_per_group=1_000, new_items=0.3, exposure=Exposure(), swing=0.0,  # as tiny_log
    )  # fmt: skip
    early = dataset(root, log, "early", "  train_end: 2024-01-05\n  val_end: 2024-01-06\n")
    late = dataset(
        root, log, "late", "  train_start: 2024-01-08\n  train_end: 2024-01-12\n"
        "  val_end: 2024-01-13\n  test_end: 2024-01-14\n",
    )  # fmt: skip
    uri, checkpoints = f"sqlite:///{root / 'mlflow.db'}", root / "checkpoints"
    parent = fit(log, uri, checkpoints, "mmoe", "--data.dataset", str(early))
    return Line(uri, log, parent, late, checkpoints, root)


def test_a_warm_start_scores_the_ids_its_parent_knew_as_the_parent(line: Line) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        parent = resolve(line.parent, MlflowClient(line.uri), Path(tmp)).loaded
        parent.state.save(Path(tmp) / "state")
        data = RankerDataModule(str(line.late), parent_state=str(Path(tmp) / "state"))
    state = data.state
    old_items, items = parent.state.categorical[1], state.categorical[1]
    assert items.name == "item_id" and state.generation == 1
    assert items.values[: len(old_items.values)] == old_items.values  # old ids keep their place
    assert len(items.values) > len(old_items.values) + 100  # the window's new items appended
    hparams = {**parent.module.hparams, "inputs": data.input_spec, "tasks": data.tasks}
    child = RankerModule(**hparams).eval()
    take_weights(child, parent, state)

    frame = parity_rows(data, 4000, ("train",))
    then, now = parent.state.transform(frame), state.transform(frame)
    new = ((then.cat == 0) & (now.cat > 0)).any(axis=1)
    for name, ids in now.sequences.items():
        new |= ((then.sequences[name] == 0) & (ids > 0)).any(axis=1)
    assert 200 < new.sum() < len(frame) - 200
    known = pl.Series(~new)
    np.testing.assert_allclose(
        torch_outputs(child, state, frame.filter(known))[OUTPUT],
        torch_outputs(parent.module, parent.state, frame.filter(known))[OUTPUT],
        rtol=0,
        atol=1e-6,
    )
    differs = (
        torch_outputs(child, state, frame.filter(~known))[OUTPUT]
        != torch_outputs(parent.module, parent.state, frame.filter(~known))[OUTPUT]
    )
    assert differs.any(axis=1).mean() > 0.9  # new ids read their own (new) rows


@pytest.fixture(scope="module")
def child(line: Line) -> str:
    """The late window warm-started from the parent, named by a registry alias."""
    client = MlflowClient(line.uri)
    client.create_registered_model("ranker-warm")
    version = client.create_model_version("ranker-warm", f"runs:/{line.parent}/x", line.parent)
    client.set_registered_model_alias("ranker-warm", "champion", version.version)
    return fit(
        line.log, line.uri, line.checkpoints, "mmoe",
        "--data.dataset", str(line.late), "--warm_start", "models:/ranker-warm@champion",
    )  # fmt: skip


def test_ranker_fit_warm_starts_from_a_registered_alias(line: Line, child: str) -> None:
    client = MlflowClient(line.uri)
    tags = client.get_run(child).data.tags
    assert tags[TAG_WARM_START] == "models:/ranker-warm@champion"
    assert tags[TAG_PARENT_RUN] == line.parent

    with tempfile.TemporaryDirectory() as tmp:
        saved = [
            read_checkpoint(locate(run, client, Path(tmp)).path) for run in (line.parent, child)
        ]
    before, after = (s["optimizer_states"][1]["state"][0] for s in saved)
    batches = len(RankerDataModule(str(line.late), batch_size=512).dataset("train"))
    assert int(after["step"]) == int(before["step"]) + batches  # SparseAdam's state carried on
    state = saved[1]["RankerDataModule"]["feature_state"]
    assert state["generation"] == 1
    known = len(saved[0]["RankerDataModule"]["feature_state"]["categorical"][1]["values"])
    moments = after["exp_avg_sq"]  # the item rows of the one 16-wide table: after user_id's
    users = len(state["categorical"][0]["values"]) + 1
    new_rows = moments[users + 1 + known : users + 1 + len(state["categorical"][1]["values"])]
    assert (new_rows.abs().sum(dim=1) > 0).float().mean() > 0.5  # new ids' rows trained


def test_compare_scores_a_champion_and_its_challenger_on_the_same_rows(
    line: Line, child: str, tmp_path: Path
) -> None:
    parent, warm = compare(
        [line.parent, child], "val", tmp_path, line.uri, quiet=True, dataset=str(line.late)
    )
    assert parent.rows == warm.rows > 1000 and parent.dataset == warm.dataset
    assert "different data" not in (tmp_path / "comparison.md").read_text()
    own = compare([line.parent, child], "val", tmp_path / "own", line.uri, quiet=True)
    assert own[0].rows != own[1].rows  # each on its own window's validation day


def test_eviction_keeps_the_most_recently_seen_ids() -> None:
    spec = FeatureSpec("item", "categorical", "item", min_count=2, max_size=5)
    old = CategoricalState("item", "item", "int", [10, 11, 12, 13], last_seen=[3, 1, 2, 3])
    counts = pl.DataFrame({"value": [20, 11, 21, 22], "count": [9, 4, 3, 1]})
    state = grown(old, counts, spec, generation=4, grow=True)
    # 11 is seen again and 20, 21 are new (22 has too few rows): all stamped 4; of the rest,
    # 10 and 13 (seen at 3) stay and 12 (seen at 2) is evicted.
    assert state.values == [10, 11, 13, 20, 21]
    assert state.last_seen == [3, 4, 3, 4, 4]
    frozen = grown(old, counts, spec, generation=4, grow=False)
    assert frozen.values == old.values and frozen.last_seen == [3, 4, 2, 3]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("  - {name: like, label: like, group: interaction, truth: p_like}\n", ""),
            "tasks [",
        ),
        (
            ("{name: item_id, kind: categorical, side: item, embedding_dim: 16}",
             "{name: item_id, kind: categorical, side: item, embedding_dim: 32}"),
            "feature 'item_id' has embedding_dim 32 here, 16 in the parent",
        ),
        (
            ("{name: item_id, kind: categorical, side: item, embedding_dim: 16}",
             "{name: item_id, kind: categorical, side: item, embedding_dim: 16, hash_buckets: 99}"),
            "feature 'item_id' is categorical hashed into 99 here, categorical in the parent",
        ),
    ],
    ids=["tasks", "width", "kind"],
)  # fmt: skip
def test_a_parent_that_does_not_match_is_an_error_naming_the_difference(
    line: Line, edit: tuple[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    split = "  train_start: 2024-01-08\n  train_end: 2024-01-12\n  val_end: 2024-01-13\n"
    name = f"bad-{len(list(line.root.glob('bad-*')))}"
    path = dataset(line.root, line.log, name, split, edit)
    with pytest.raises(SystemExit):
        fit(line.log, line.uri, line.checkpoints, "mmoe", "--data.dataset", str(path),
            "--warm_start", line.parent)  # fmt: skip
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("0123456789abcdef0123456789abcdef", "no MLflow run '0123456789abcdef0123456789abcdef'"),
        ("models:/no-such-model@champion", "not in the model registry of the tracking store"),
    ],
)
def test_a_parent_that_does_not_exist_names_the_store(
    line: Line, reference: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        fit(line.log, line.uri, line.checkpoints, "mmoe",
            "--data.dataset", str(line.late), "--warm_start", reference)  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and line.uri in err


def test_the_optimizer_moments_follow_their_rows() -> None:
    """``CarryOptimizerState`` moves each embedding row's moments to the row's new place."""
    from pipelines.warm_start import CarryOptimizerState

    table = torch.nn.Parameter(torch.zeros(5, 2))
    dense = torch.nn.Parameter(torch.zeros(3))
    optimizers = [torch.optim.AdamW([dense]), torch.optim.SparseAdam([table])]
    moments = torch.arange(8, dtype=torch.float32).view(4, 2)
    states = [
        {"state": {}, "param_groups": [{"params": [0]}]},
        {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": moments, "exp_avg_sq": moments}},
            "param_groups": [{"params": [0], "lr": 1.0}],
        },
    ]
    rows = [torch.tensor([0, 2, -1, 1, 3])]

    class Trainer:
        pass

    trainer = Trainer()
    trainer.optimizers = optimizers
    CarryOptimizerState(states, rows).on_train_start(trainer, None)
    state = optimizers[1].state[table]
    assert float(state["step"]) == 7.0
    expected = torch.stack([moments[0], moments[2], torch.zeros(2), moments[1], moments[3]])
    torch.testing.assert_close(state["exp_avg"], expected)
    assert optimizers[1].param_groups[0]["lr"] == 1e-3  # this run's learning rate, not the parent's
