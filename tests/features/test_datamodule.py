"""The streaming DataModule: every row of a split exactly once per epoch, in whole batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch.utils.data import DataLoader

from features.config import ConfigError
from features.datamodule import ParquetBatches, RankerDataModule, batch_sizes, shares
from tests.conftest import KUAIRAND_CONFIG, SYNTHETIC_CONFIG


def fingerprints(batches: list[tuple[torch.Tensor, ...]]) -> np.ndarray:
    """One int per row (its categorical ids hashed), to compare multisets of rows."""
    cat = torch.cat([b.cat for b in batches]).numpy()
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
    assert sum(len(b) for b in batches) == datamodule.split_rows[split]
    np.testing.assert_array_equal(fingerprints(batches), expected_fingerprints(datamodule, split))
    size = datamodule.batch_size if split == "train" else datamodule.eval_batch_size
    sizes = [len(b) for b in batches]
    assert len(batches) == len(datamodule.dataset(split)) == -(-len(fingerprints(batches)) // size)
    assert max(sizes) <= size and max(sizes) - min(sizes) <= 1  # rows divided evenly
    first = batches[0]
    cat, num, labels, users = first.cat, first.num, first.labels, first.users
    assert cat.dtype == torch.int64 and num.dtype == torch.float32
    assert labels.dtype == torch.float32 and users.dtype == torch.int64
    assert cat.is_contiguous() and labels.shape[1] == len(datamodule.tasks)


def test_training_order_is_shuffled_differently_each_epoch(datamodule: RankerDataModule) -> None:
    train = datamodule.dataset("train")
    train.set_epoch(0)
    first = torch.cat([b.cat for b in train])
    again = torch.cat([b.cat for b in train])
    train.set_epoch(1)
    second = torch.cat([b.cat for b in train])
    assert torch.equal(first, again)  # deterministic per epoch
    assert not torch.equal(first, second)
    # rows are mixed across row groups, not only row groups reordered
    users = first[:512, 0].numpy()
    assert len(np.unique(users)) > 200


def test_only_row_groups_of_the_split_are_read(datamodule: RankerDataModule) -> None:
    pieces = {split: found for split, (found, _) in datamodule.split_pieces.items()}
    assert len(pieces["val"]) < len(datamodule.source.pieces) / 5
    assert not set(map(id, pieces["val"])) & set(map(id, pieces["train"]))
    for split, (_, rows) in datamodule.split_pieces.items():  # exact counts, all nonzero
        assert sum(rows) == datamodule.split_rows[split] and min(rows) > 0


def test_loader_workers_share_the_row_groups(tiny_log: Path) -> None:
    dm = RankerDataModule(
        str(SYNTHETIC_CONFIG),
        log_path=str(tiny_log),
        batch_size=500,
        num_workers=2,
        shuffle_buffer=2_000,
    )
    batches = list(dm.train_dataloader())
    assert sum(len(b) for b in batches) == dm.split_rows["train"]
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


@pytest.mark.parametrize("streams", [1, 2, 3, 7, 40])
def test_shares_cover_every_row_once_and_differ_by_one_row(streams: int) -> None:
    rng = np.random.default_rng(streams)
    rows = rng.integers(1, 500, size=23)
    order = rng.permutation(len(rows))
    taken = np.zeros((len(rows), rows.max()), dtype=int)
    sizes = []
    for share in shares(rows, order, streams):
        for piece, start, stop in share:
            assert 0 <= start < stop <= rows[piece]
            taken[piece, start:stop] += 1
        sizes.append(sum(stop - start for _, start, stop in share))
    for piece, n in enumerate(rows):
        assert (taken[piece, :n] == 1).all() and (taken[piece, n:] == 0).all()
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == rows.sum()
    assert batch_sizes(10, 4).tolist() == [3, 3, 2, 2]


def stream_batches(dm: RankerDataModule, ranks: int, rank: int) -> list[tuple[torch.Tensor, ...]]:
    """One rank's training batches, as that rank's loader yields them."""
    dataset = dm.dataset("train")
    dataset.world = (ranks, rank)
    return list(DataLoader(dataset, batch_size=None))


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_gets_the_same_batches_and_every_row_once(
    datamodule: RankerDataModule, ranks: int
) -> None:
    per_rank = [stream_batches(datamodule, ranks, rank) for rank in range(ranks)]
    datamodule.dataset("train").world = (1, 0)
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1  # no rank waits for another at the end of the epoch
    everything = [b for batches in per_rank for b in batches]
    np.testing.assert_array_equal(
        fingerprints(everything), expected_fingerprints(datamodule, "train")
    )


def test_too_many_streams_for_the_rows_is_refused(datamodule: RankerDataModule) -> None:
    dataset = ParquetBatches(
        datamodule.source,
        datamodule.state,
        "val",
        *datamodule.split_pieces["val"],
        batch_size=512,
        shuffle=True,
        num_workers=2,
    )
    dataset.world = (datamodule.split_rows["val"], 0)
    with pytest.raises(ConfigError, match="too few for"):
        dataset.check()


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_yields_exactly_the_batches_not_yet_trained_on(
    tiny_log: Path, workers: int
) -> None:
    dm = RankerDataModule(
        str(SYNTHETIC_CONFIG),
        log_path=str(tiny_log),
        batch_size=500,
        num_workers=workers,
        shuffle_buffer=2_000,
    )
    dm.set_epoch(1)
    whole = [b.cat for b in dm.train_dataloader()]
    assert len(whole) == len(dm.dataset("train"))
    done = 7
    dm.load_state_dict({**dm.state_dict(), "progress": {"epoch": 1, "batches": done}})
    rest = [b.cat for b in dm.train_dataloader()]
    assert len(rest) == len(whole) - done
    for resumed, original in zip(rest, whole[done:], strict=True):
        assert torch.equal(resumed, original)


def test_batches_made_ahead_are_the_batches_made_between_steps(tiny_log: Path) -> None:
    """``prefetch_batches`` moves the work to a thread and changes nothing else: the same
    batches in the same order, sequences included."""

    def batches(prefetch: int) -> list:
        dm = RankerDataModule(
            str(SYNTHETIC_CONFIG), log_path=str(tiny_log), batch_size=500,
            shuffle_buffer=2_000, prefetch_batches=prefetch,
        )  # fmt: skip
        dm.set_epoch(2)
        return list(dm.train_dataloader())

    between, ahead = batches(0), batches(3)
    assert len(between) == len(ahead) > 10
    for one, other in zip(between, ahead, strict=True):
        assert torch.equal(one.cat, other.cat) and torch.equal(one.users, other.users)
        assert torch.equal(one.num, other.num)
        assert torch.equal(one.labels.nan_to_num(-1), other.labels.nan_to_num(-1))
        assert one.sequences.keys() == other.sequences.keys() and one.sequences
        for name, ids in one.sequences.items():
            assert torch.equal(ids, other.sequences[name])


def test_the_input_spec_says_which_share_of_validation_ids_has_no_row(
    datamodule: RankerDataModule,
) -> None:
    """For the catalogue (item-side, over 1,000 ids: the tiny log's item_id), validation rows
    whose value is not in the training vocabulary (unseen, folded by min_count, or missing),
    counted here from the raw column; the other inputs are not measured."""
    spec, val = datamodule.input_spec, datamodule.source.scan("val", sequences=False).collect()
    assert spec.catalogue == ("item_id",)
    (state,) = [s for s in datamodule.state.categorical if s.name == "item_id"]
    known = pl.Series(state.values).cast(val[state.column].dtype)
    expected = 1 - val[state.column].is_in(known.implode()).fill_null(False).mean()
    shares = dict(zip(spec.cat_names, spec.cat_unseen, strict=True))
    assert shares.pop("item_id") == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 0.1
    assert set(shares.values()) <= {None, 0.0}  # not measured (0.0: quantile buckets)
    train = datamodule.state.unseen_shares(
        datamodule.source.scan("train", sequences=False), ("user_id",)
    )
    assert train[spec.cat_names.index("user_id")] == 0  # every user of training has a row
