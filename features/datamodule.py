"""Parquet behaviour logs as Lightning batches.

Batches are cut from whole row groups: each row group of the split is read (pyarrow), joined
and transformed (polars, vectorised) into contiguous arrays, pooled in a bounded shuffle
buffer, permuted, and sliced into ready ``(cat, num, labels, users)`` tensors. There is no
per-row Python and no per-sample collation; the DataLoader passes batches through as they are.

Shuffling is two-level and bounded: the order of row groups is permuted every epoch, and rows
are permuted within a buffer of ``shuffle_buffer`` rows. Memory holds the buffer, never the log.
Each loader worker (and each DDP rank) reads a disjoint share of the row groups.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from features.config import ConfigError, DatasetConfig, SplitName, TaskSpec
from features.source import LogSource, Piece
from features.state import Batch, FeatureState, InputSpec

# ParquetBatches.__len__ is built for several workers (an upper bound); Lightning's caution
# about lengths of iterable datasets does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

TensorBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    return Batch(
        *(
            np.concatenate([getattr(b, k) for b in batches])
            for k in ("cat", "num", "labels", "users")
        )
    )


def _slice(batch: Batch, index: slice | np.ndarray) -> Batch:
    return Batch(batch.cat[index], batch.num[index], batch.labels[index], batch.users[index])


def to_tensors(batch: Batch) -> TensorBatch:
    return (
        torch.from_numpy(batch.cat),
        torch.from_numpy(batch.num),
        torch.from_numpy(batch.labels),
        torch.from_numpy(batch.users),
    )


def _world() -> tuple[int, int]:
    """(world size, rank) under torch.distributed, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ParquetBatches(IterableDataset):
    """Batches of one split, streamed row group by row group."""

    def __init__(
        self,
        source: LogSource,
        state: FeatureState,
        split: SplitName,
        pieces: list[Piece],
        rows: int,
        batch_size: int,
        shuffle: bool,
        shuffle_buffer: int = 262_144,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.source, self.state, self.split = source, state, split
        self.num_workers = max(num_workers, 1)
        self.pieces, self.rows = pieces, rows
        self.batch_size, self.shuffle = batch_size, shuffle
        self.shuffle_buffer, self.seed = max(shuffle_buffer, batch_size), seed
        # Shared memory, so persistent (spawned) workers see the epoch the trainer sets.
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # (world size, rank), read in the training process when its loader is made: spawned
        # loader workers have no process group of their own to ask.
        self.world = _world()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        # Each stream (worker) ends with at most one partial batch: exact for one stream, an
        # upper bound otherwise. Never an underestimate, which would cut epochs short.
        return math.ceil(self.rows / self.batch_size) + self.streams - 1

    @property
    def streams(self) -> int:
        return self.num_workers * self.world[0]

    def _my_pieces(self) -> list[Piece]:
        order = np.arange(len(self.pieces))
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(self.epoch)]).permutation(order)
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        ranks, rank = self.world
        share = rank * workers + worker_id
        return [self.pieces[i] for i in order[share :: ranks * workers]]

    def __iter__(self) -> Iterator[TensorBatch]:
        rng = np.random.default_rng([self.seed, int(self.epoch), 1])
        buffered: list[Batch] = []
        rows = 0
        for piece in self._my_pieces():
            frame = self.source.read_piece(piece, self.split)
            if frame.height == 0:
                continue
            buffered.append(self.state.transform(frame))
            rows += frame.height
            if rows >= self.shuffle_buffer:
                pool = _concat(buffered)
                if self.shuffle:
                    pool = _slice(pool, rng.permutation(len(pool)))
                full = len(pool) - len(pool) % self.batch_size
                for start in range(0, full, self.batch_size):
                    yield to_tensors(_slice(pool, slice(start, start + self.batch_size)))
                buffered, rows = [_slice(pool, slice(full, None))], len(pool) - full
        if rows:
            pool = _concat(buffered)
            if self.shuffle:
                pool = _slice(pool, rng.permutation(len(pool)))
            for start in range(0, len(pool), self.batch_size):
                part = _slice(pool, slice(start, start + self.batch_size))
                if self.shuffle and len(part) < 2:
                    continue  # a one-row training batch breaks BatchNorm; one row is no loss
                yield to_tensors(part)


class RankerDataModule(L.LightningDataModule):
    """A dataset config's log, checked up front, fitted on train, streamed by split.

    Args:
        dataset: path of a dataset config (``configs/data/*.yaml``).
        log_path: read the log from here instead of the config's ``path``.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size (2,048: HoME validates 1.55x faster
            than at 16,384 on 2 cores, its activations staying in cache).
        num_workers: loader processes per split (0 = in the training process).
        shuffle_buffer: rows pooled and permuted together when training.
        seed: shuffling seed.
    """

    def __init__(
        self,
        dataset: str,
        log_path: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
        shuffle_buffer: int = 262_144,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # In the checkpoint ("datamodule_hyper_parameters"): where the model's data lives.
        self.save_hyperparameters(logger=False)
        config = DatasetConfig.from_yaml(dataset)
        self.config = config.with_path(log_path) if log_path else config
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        # Everything that can be wrong with the data fails here, before any training.
        self.source = LogSource(self.config)
        self.split_rows = self.source.validate()
        self._datasets: dict[str, ParquetBatches] = {}

    @cached_property
    def state(self) -> FeatureState:
        return FeatureState.fit(self.source.scan("train"), self.config)

    @property
    def input_spec(self) -> InputSpec:
        return self.state.input_spec(self.config.features)

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.config.tasks

    def save_state(self, directory: str | Path) -> Path:
        return self.state.save(directory)

    def use_state(self, state: FeatureState) -> None:
        """Score with a FeatureState fitted earlier (a checkpoint's) instead of refitting."""
        if [t.name for t in state.tasks] != [t.name for t in self.tasks]:
            raise ConfigError(
                f"the feature state predicts {[t.name for t in state.tasks]} but "
                f"{self.config.source} defines tasks {[t.name for t in self.tasks]}"
            )
        self.__dict__["state"] = state  # fills the cached property
        self._datasets.clear()

    def state_dict(self) -> dict[str, Any]:
        # Saved in every checkpoint: a checkpoint alone can score raw rows (evaluate, export),
        # and says (as absolute paths) which dataset config and log it was trained on.
        return {
            "feature_state": self.state.to_dict(),
            "dataset": str(self.config.source.resolve()) if self.config.source else None,
            "log_path": str(self.config.path.resolve()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.use_state(FeatureState.from_dict(state_dict["feature_state"]))

    @cached_property
    def split_pieces(self) -> dict[str, list[Piece]]:
        """Row groups holding rows of each split, found by reading only the time column."""
        time = self.config.time_column
        pieces: dict[str, list[Piece]] = {"train": [], "val": [], "test": []}
        for piece in self.source.pieces:
            frame = self.source.read_piece_columns(piece, (time,))
            for split, kept in pieces.items():
                if frame.select(self.source.split_filter(split).any()).item():
                    kept.append(piece)
        return pieces

    def dataset(self, split: SplitName) -> ParquetBatches:
        if split not in self._datasets:
            train = split == "train"
            self._datasets[split] = ParquetBatches(
                self.source,
                self.state,
                split,
                self.split_pieces[split],
                self.split_rows[split],
                self.batch_size if train else self.eval_batch_size,
                shuffle=train,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                num_workers=self.num_workers,
            )
        return self._datasets[split]

    def set_epoch(self, epoch: int) -> None:
        self.dataset("train").set_epoch(epoch)

    def _loader(self, split: SplitName) -> DataLoader:
        workers = self.num_workers
        dataset = self.dataset(split)
        dataset.world = _world()  # the process group exists by the time loaders are made
        return DataLoader(
            dataset,
            batch_size=None,  # batches arrive whole
            num_workers=workers,
            # polars' thread pool does not survive fork(); spawn and keep the workers.
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
