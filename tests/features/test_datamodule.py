"""The streaming DataModule: every row of a split exactly once per epoch, in whole batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.datamodule import RankerDataModule
from tests.conftest import KUAIRAND_CONFIG, SYNTHETIC_CONFIG


def fingerprints(batches: list[tuple[torch.Tensor, ...]]) -> np.ndarray:
    """One int per row (its categorical ids hashed), to compare multisets of rows."""
    cat = torch.cat([b[0] for b in batches]).numpy()
    return np.sort(pl.DataFrame(cat).hash_rows(seed=1).to_numpy())


def expected_fingerprints(dm: RankerDataModule, split: str) -> np.ndarray:
    frame = dm.source.scan(split).collect()
    cat = dm.state.transform(frame).cat
    return np.sort(pl.DataFrame(cat).hash_rows(seed=1).to_numpy())


@pytest.fixture(scope="module")
def datamodule(tiny_log: Path) -> RankerDataModule:
    return RankerDataModule(
        str(SYNTHETIC_CONFIG),
        log_path=str(tiny_log),
        batch_size=512,
        eval_batch_size=1024,
        num_workers=0,
        shuffle_buffer=3_000,
    )


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_row_once_per_epoch(datamodule: RankerDataModule, split: str) -> None:
    batches = list(datamodule.dataset(split))
    assert sum(len(b[0]) for b in batches) == datamodule.split_rows[split]
    np.testing.assert_array_equal(fingerprints(batches), expected_fingerprints(datamodule, split))
    size = datamodule.batch_size if split == "train" else datamodule.eval_batch_size
    assert all(len(b[0]) == size for b in batches[:-1])
    cat, num, labels, users = batches[0]
    assert cat.dtype == torch.int64 and num.dtype == torch.float32
    assert labels.dtype == torch.float32 and users.dtype == torch.int64
    assert cat.is_contiguous() and labels.shape[1] == len(datamodule.tasks)


def test_training_order_is_shuffled_differently_each_epoch(datamodule: RankerDataModule) -> None:
    train = datamodule.dataset("train")
    train.set_epoch(0)
    first = torch.cat([b[0] for b in train])
    again = torch.cat([b[0] for b in train])
    train.set_epoch(1)
    second = torch.cat([b[0] for b in train])
    assert torch.equal(first, again)  # deterministic per epoch
    assert not torch.equal(first, second)
    # rows are mixed across row groups, not only row groups reordered
    users = first[:512, 0].numpy()
    assert len(np.unique(users)) > 200


def test_only_row_groups_of_the_split_are_read(datamodule: RankerDataModule) -> None:
    pieces = datamodule.split_pieces
    assert len(pieces["val"]) < len(datamodule.source.pieces) / 5
    assert not set(map(id, pieces["val"])) & set(map(id, pieces["train"]))


def test_loader_workers_share_the_row_groups(tiny_log: Path) -> None:
    dm = RankerDataModule(
        str(SYNTHETIC_CONFIG),
        log_path=str(tiny_log),
        batch_size=500,
        num_workers=2,
        shuffle_buffer=2_000,
    )
    batches = list(dm.train_dataloader())
    assert sum(len(b[0]) for b in batches) == dm.split_rows["train"]
    np.testing.assert_array_equal(fingerprints(batches), expected_fingerprints(dm, "train"))


def test_kuairand_side_tables_join() -> None:
    dm = RankerDataModule(str(KUAIRAND_CONFIG), num_workers=0)
    assert dm.split_rows == {"train": 33_485, "val": 4_508, "test": 3_835}
    spec = dm.input_spec
    frame = dm.source.scan("train").collect()
    batch = dm.state.transform(frame)
    column = spec.cat_names.index("user_active_degree")
    assert (batch.cat[:, column] > 0).all()  # every log user is in user_features
    author = spec.cat_names.index("author_id")
    known = (batch.cat[:, author] > 0).mean()
    assert 0 < known < 0.1  # the video table covers a few percent of the log's videos
