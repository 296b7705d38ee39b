"""Parquet behaviour logs as Lightning batches.

Batches are cut from whole row groups: each row group of the split is read (pyarrow), joined
and transformed (polars, vectorised) into contiguous arrays, pooled in a bounded shuffle
buffer, permuted, and sliced into ready ``TensorBatch``es (named fields). There is no
per-row Python and no per-sample collation; the DataLoader passes batches through as they are.

Shuffling is two-level and bounded: the order of row groups is permuted every epoch, and rows
are permuted within a buffer of ``shuffle_buffer`` rows. Memory holds the buffer, never the log.

Sharding: every DDP rank and loader worker is one *stream*. An epoch's rows (row groups in
the epoch's order) are cut into as many contiguous shares as there are streams, equal to one
row, and every stream yields the same number of batches (``batch_size`` at most, sizes within
one row of each other). So each row is read once per epoch, no rank waits at the end of an
epoch for another, and a stream's batches are known in advance: a run resumed mid-epoch skips
exactly the batches it had already trained on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from features.config import SPLITS, ConfigError, DatasetConfig, SplitName, TaskSpec
from features.history import EventSlices
from features.prefetch import prefetched
from features.source import LogSource, Piece
from features.state import Batch, FeatureState, InputSpec, map_fields

# ParquetBatches.__len__ is exact with any number of workers (each stream's batches are planned);
# Lightning's caution about lengths of iterable datasets does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
# Lightning asks the DataLoader for a resumable state; this DataModule's own state (saved in the
# checkpoint) resumes the epoch where it stopped, so its warning does not apply either.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")

# (piece index, first row, end row) of the piece's split rows
Span = tuple[int, int, int]


@dataclass
class TensorBatch:
    """One batch as it travels from the DataModule to the model, the metrics and the
    diagnostics (Lightning moves every tensor to the device)."""

    cat: torch.Tensor  # int64 [B, F_cat], per-feature vocabulary indices
    num: torch.Tensor  # float32 [B, F_num]
    labels: torch.Tensor  # float32 [B, T], NaN = not observed
    users: torch.Tensor  # int64 [B], the GAUC group
    sequences: dict[str, torch.Tensor] = field(default_factory=dict)  # int64 [B, L], 0 = pad
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)  # int64 [B], untruncated
    treatment: torch.Tensor | None = None  # int64 [B]: the arm received, 0 = control (uplift)
    propensity: torch.Tensor | None = None  # float32 [B]: its probability (1 where not logged)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """What a model takes: ``model(*batch.inputs)``."""
        return self.cat, self.num, self.sequences

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TensorBatch:
        """The same batch with ``fn`` applied to every tensor."""
        return map_fields(self, fn)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> TensorBatch:
        """Every tensor on ``device`` (Lightning calls this to move a batch; so does
        ``ranker.scoring``). ``non_blocking`` (default: on for a GPU) overlaps the copy from
        pinned memory with the work under way."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return self.map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> TensorBatch:
        """Every tensor in page-locked memory (the DataLoader calls this with
        ``pin_memory=True``): copies to a GPU can then run asynchronously."""
        return self.map(lambda t: t.pin_memory())


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    return Batch(
        *(
            np.concatenate([getattr(b, k) for b in batches])
            for k in ("cat", "num", "labels", "users")
        ),
        {k: _concat_sequences([b.sequences[k] for b in batches]) for k in first.sequences},
        {k: np.concatenate([b.lengths[k] for b in batches]) for k in first.lengths},
        *(
            None if getattr(first, k) is None else np.concatenate([getattr(b, k) for b in batches])
            for k in ("treatment", "propensity")
        ),
    )


def _concat_sequences(parts: list[np.ndarray | EventSlices]) -> np.ndarray | EventSlices:
    if isinstance(parts[0], EventSlices):
        return EventSlices.concat(parts)  # type: ignore[arg-type]
    return np.concatenate(parts)


def _slice(batch: Batch, index: slice | np.ndarray) -> Batch:
    return batch.map(lambda a: a[index])


def to_tensors(batch: Batch) -> TensorBatch:
    """A cut batch as tensors (histories sliced from the events become ``[B, L]`` ids)."""
    sequences = {
        k: v.ids() if isinstance(v, EventSlices) else v for k, v in batch.sequences.items()
    }
    t = dataclasses.replace(batch, sequences=sequences).map(torch.from_numpy)
    return TensorBatch(
        t.cat, t.num, t.labels, t.users, t.sequences, t.lengths, t.treatment, t.propensity
    )


def frame_batches(
    state: FeatureState, frame: pl.DataFrame, batch_size: int = 16_384
) -> Iterator[TensorBatch]:
    """Raw rows (side tables joined, derived histories present) transformed once, then cut
    into batches of ``batch_size`` rows, in order."""
    batch = state.transform(frame)
    for begin in range(0, len(batch), batch_size):
        yield to_tensors(_slice(batch, slice(begin, begin + batch_size)))


def _world() -> tuple[int, int]:
    """(world size, rank) under torch.distributed, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def shares(rows: np.ndarray, order: np.ndarray, streams: int) -> list[list[Span]]:
    """The rows of the pieces, taken in ``order``, cut into ``streams`` contiguous shares whose
    sizes differ by at most one row; a piece on a boundary is read by both neighbours."""
    sizes = rows[order]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    total = int(ends[-1]) if len(ends) else 0
    bounds = np.arange(streams + 1, dtype=np.int64) * total // streams
    result = []
    for low, high in itertools.pairwise(bounds):
        first = int(np.searchsorted(ends, low, side="right"))
        last = int(np.searchsorted(starts, high, side="left"))
        spans = []
        for j in range(first, last):
            begin, end = max(low, starts[j]) - starts[j], min(high, ends[j]) - starts[j]
            if end > begin:
                spans.append((int(order[j]), int(begin), int(end)))
        result.append(spans)
    return result


def batch_sizes(rows: int, batches: int) -> np.ndarray:
    """``rows`` cut into ``batches`` sizes that differ by at most one."""
    sizes = np.full(batches, rows // batches, dtype=np.int64)
    sizes[: rows % batches] += 1
    return sizes


class ParquetBatches(IterableDataset):
    """Batches of one split, streamed row group by row group, an equal share per stream."""

    def __init__(
        self,
        source: LogSource,
        state: FeatureState,
        split: SplitName,
        pieces: list[Piece],
        piece_rows: list[int],
        batch_size: int,
        shuffle: bool,
        shuffle_buffer: int = 262_144,
        seed: int = 0,
        num_workers: int = 0,
        prefetch: int = 0,
    ) -> None:
        self.source, self.state, self.split = source, state, split
        self.workers = max(num_workers, 1)
        self.prefetch = 0 if num_workers else prefetch  # workers prefetch on their own
        self.pieces, self.piece_rows = pieces, np.asarray(piece_rows, dtype=np.int64)
        self.rows = int(self.piece_rows.sum())
        self.batch_size, self.shuffle = batch_size, shuffle
        self.shuffle_buffer, self.seed = max(shuffle_buffer, batch_size), seed
        # Shared memory, so persistent (spawned) workers see what the trainer sets: the epoch,
        # and how many of its batches this rank already trained on (when resumed mid-epoch).
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.skip = torch.zeros(1, dtype=torch.int64).share_memory_()
        # (world size, rank), read in the training process when its loader is made: spawned
        # loader workers have no process group of their own to ask.
        self.world = _world()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch.fill_(epoch)
        self.skip.fill_(skip)

    @property
    def streams(self) -> int:
        return self.workers * self.world[0]

    @property
    def batches_per_stream(self) -> int:
        return math.ceil(math.ceil(self.rows / self.streams) / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_stream * self.workers  # exact, and equal on every rank

    def check(self) -> None:
        """Refuse a split too small to give every stream its batches (a rank would hang)."""
        smallest = self.rows // self.streams // max(self.batches_per_stream, 1)
        if smallest < (2 if self.shuffle else 1):  # one-row training batches break BatchNorm
            raise ConfigError(
                f"the {self.split} split has {self.rows} rows, too few for {self.streams} "
                f"streams ({self.world[0]} rank(s) x {self.workers} loader worker(s)); "
                "use fewer loader workers or processes"
            )

    def _stream(self) -> tuple[int, int]:
        """(index of this stream, batches it skips). A rank's loader takes its W workers'
        batches in turn, starting again at worker 0 when resumed after n batches: so worker w
        plays stream (w + n) mod W of the rank, which had given ceil((n - that) / W) of them."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        done = int(self.skip)
        role = (worker_id + done) % workers
        return self.world[1] * workers + role, max(0, -(-(done - role) // workers))

    def __iter__(self) -> Iterator[TensorBatch]:
        return prefetched(self._batches(), self.prefetch)

    def _batches(self) -> Iterator[TensorBatch]:
        stream, skip = self._stream()
        epoch = int(self.epoch)
        order = np.arange(len(self.pieces))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        share = shares(self.piece_rows, order, self.streams)[stream]
        sizes = batch_sizes(sum(stop - start for _, start, stop in share), self.batches_per_stream)
        rng = np.random.default_rng([self.seed, epoch, 1, stream])
        buffered: list[Batch] = []
        pooled = batch = 0
        for position, (index, start, stop) in enumerate(share):
            frame = self.source.read_piece(self.pieces[index], self.split, positions=True)
            if frame.height != self.piece_rows[index]:
                raise ConfigError(f"{self.pieces[index].path} changed while training")
            buffered.append(self.state.transform(frame[start:stop], self.source.events))
            pooled += stop - start
            if pooled < self.shuffle_buffer and position < len(share) - 1:
                continue
            pool = _concat(buffered)
            if self.shuffle:
                pool = _slice(pool, rng.permutation(len(pool)))
            used = 0
            while batch < len(sizes) and used + sizes[batch] <= len(pool):
                if batch >= skip:
                    yield to_tensors(_slice(pool, slice(used, used + sizes[batch])))
                used, batch = used + sizes[batch], batch + 1
            buffered, pooled = [_slice(pool, slice(used, None))], len(pool) - used


class RankerDataModule(L.LightningDataModule):
    """A dataset config's log, checked up front, fitted on train, streamed by split.

    Args:
        dataset: path of a dataset config (``configs/data/*.yaml``).
        log_path: read the log from here instead of the config's ``path``.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size (2,048: the activations stay in cache;
            the measured speed-up over 16,384 is in ``benchmarks/RESULTS.md``).
        num_workers: loader processes per split (0 = in the training process).
        prefetch_batches: with ``num_workers`` 0, batches a thread of the training process
            makes ahead of the step (``features.prefetch``; 0 = made between steps).
        shuffle_buffer: rows pooled and permuted together when training.
        seed: shuffling seed (``ranker fit``: the run's ``seed_everything`` unless given).
        skip_corrupt_files: leave out log files that cannot be read (each file is decoded
            once up front to find them), reported and counted in the run's metrics, instead
            of stopping with an error naming the first.
        history_cache: where histories derived from the log are cached (default
            ``$RANKER_CACHE`` or ``~/.cache/ranker``).
        max_unassigned: the largest share of the log's rows that may fall in no split (a
            null time, before the train start, after the test end) before the run stops with
            an error; 1.0 only reports them (``accounting``, printed and logged by
            ``ranker fit``).
        parent_state: a warm start's parent FeatureState (a directory ``FeatureState.save``
            wrote; ``ranker fit --warm_start`` sets it): the vocabularies grow from the
            parent's (``features.state.grown``), the numeric statistics are the parent's.
        grow_vocabulary: with ``parent_state``, add the window's new ids (else the parent's
            vocabularies stay as they were: new ids score as unknown).
        refit_numeric: with ``parent_state``, fit the numeric statistics on this window.
    """

    def __init__(
        self,
        dataset: str,
        log_path: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
        prefetch_batches: int = 2,
        shuffle_buffer: int = 262_144,
        seed: int | None = None,
        skip_corrupt_files: bool = False,
        history_cache: str | None = None,
        max_unassigned: float = 1.0,
        parent_state: str | None = None,
        grow_vocabulary: bool = True,
        refit_numeric: bool = False,
    ) -> None:
        super().__init__()
        # In the checkpoint ("datamodule_hyper_parameters"): where the model's data lives.
        self.save_hyperparameters(logger=False)
        config = DatasetConfig.from_yaml(dataset)
        self.config = config.with_path(log_path) if log_path else config
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.prefetch_batches = prefetch_batches
        self.seed = 0 if seed is None else seed
        # Everything that can be wrong with the data fails here, before any training.
        cache = Path(history_cache) / "histories" if history_cache else None
        self.source = LogSource(self.config, skip_corrupt_files, cache)
        for why in self.source.skipped.values():
            warnings.warn(f"skipped: {why}", stacklevel=2)
        self.accounting = self.source.validate()  # where every row of the log goes
        per_split = self.accounting.group_by("split").agg(pl.col("rows").sum())
        rows = dict(zip(per_split["split"].to_list(), per_split["rows"].to_list(), strict=True))
        self.split_rows = {split: int(rows.get(split, 0)) for split in SPLITS}
        unassigned, total = int(rows.get("none", 0)), int(per_split["rows"].sum())
        if unassigned > max_unassigned * total:
            reasons = self.accounting.filter(pl.col("split") == "none")
            pairs = zip(reasons["reason"], reasons["rows"], strict=True)
            why = ", ".join(f"{n:,} {r}" for r, n in pairs)
            raise ConfigError(
                f"{unassigned:,} of the {total:,} rows of {self.source.where} are in no split "
                f"({why}): more than --data.max_unassigned {max_unassigned}"
            )
        self._datasets: dict[str, ParquetBatches] = {}
        self._resume: dict[str, int] | None = None  # from a checkpoint taken while training
        self.parent = FeatureState.load(parent_state) if parent_state else None
        self.grow_vocabulary, self.refit_numeric = grow_vocabulary, refit_numeric

    @cached_property
    def state(self) -> FeatureState:
        train = self.source.scan("train", sequences=False)
        return FeatureState.fit(
            train,
            self.config,
            self.split_rows["train"],
            self.parent,
            self.grow_vocabulary,
            self.refit_numeric,
        )

    @property
    def input_spec(self) -> InputSpec:
        spec = self.state.input_spec(self.config.features)
        return dataclasses.replace(spec, cat_unseen=self.unseen_shares)

    @cached_property
    def unseen_shares(self) -> tuple[float | None, ...]:
        """Per embedded input of the catalogue (``InputSpec.catalogue``), the share of
        validation rows whose id has no row of its own (``FeatureState.unseen_shares``; the
        catalogue rate's rule reads it); () without validation rows or a catalogue. Only the
        catalogue's columns are read (the rest of a validation file is the loader's to read,
        and to report if it is corrupt)."""
        features = self.state.input_spec(self.config.features).catalogue
        if not self.split_rows["val"] or not features:
            return ()
        try:
            return self.state.unseen_shares(self.source.scan("val", sequences=False), features)
        except (pl.exceptions.PolarsError, OSError) as err:
            columns = [s.column for s in self.state.categorical if s.name in features]
            raise self.source.unreadable(columns, err) from None

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
        self.__dict__.pop("unseen_shares", None)  # measured against the vocabularies in use
        self._datasets.clear()

    def state_dict(self) -> dict[str, Any]:
        # Saved in every checkpoint: a checkpoint alone can score raw rows (evaluate, export),
        # and says (as absolute paths) which dataset config and log it was trained on; while
        # training, also where in the epoch it was taken (to resume there).
        return {
            "feature_state": self.state.to_dict(),
            "dataset": str(self.config.source.resolve()) if self.config.source else None,
            "log_path": str(self.config.path.resolve()) if self.config.path else None,
            "progress": self._progress(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.use_state(FeatureState.from_dict(state_dict["feature_state"]))
        self._resume = state_dict.get("progress")

    def _progress(self) -> dict[str, int] | None:
        """{epoch, batches of it this rank has trained on} while fitting, else None."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= len(self.dataset("train")):  # the epoch is over: resume at the next
            return {"epoch": trainer.current_epoch + 1, "batches": 0}
        return {"epoch": trainer.current_epoch, "batches": done}

    @cached_property
    def split_pieces(self) -> dict[str, tuple[list[Piece], list[int]]]:
        """Row groups holding rows of each split, and how many, read from the split columns only
        (exact counts: each stream's share and batches are planned from them)."""
        pieces: dict[str, tuple[list[Piece], list[int]]] = {s: ([], []) for s in SPLITS}
        for piece in self.source.pieces:
            frame = self.source.read_piece_columns(piece, self.source.split_columns)
            counts = frame.select(self.source.split_filter(s).sum().alias(s) for s in SPLITS)
            for split, rows in counts.row(0, named=True).items():
                if rows:
                    pieces[split][0].append(piece)
                    pieces[split][1].append(rows)
        return pieces

    def dataset(self, split: SplitName) -> ParquetBatches:
        if split not in self._datasets:
            train = split == "train"
            self._datasets[split] = ParquetBatches(
                self.source,
                self.state,
                split,
                *self.split_pieces[split],
                self.batch_size if train else self.eval_batch_size,
                shuffle=train,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                num_workers=self.num_workers,
                prefetch=self.prefetch_batches,
            )
        return self._datasets[split]

    def set_epoch(self, epoch: int) -> None:
        self.dataset("train").set_epoch(epoch)

    def _loader(self, split: SplitName) -> DataLoader:
        workers = self.num_workers
        dataset = self.dataset(split)
        dataset.world = _world()  # the process group exists by the time loaders are made
        dataset.check()
        if split == "train" and self._resume:
            # Resumed from a checkpoint: the same epoch's plan, less the batches trained on.
            dataset.set_epoch(self._resume["epoch"], skip=self._resume["batches"])
            self._resume = None
        return DataLoader(
            dataset,
            batch_size=None,  # batches arrive whole
            num_workers=workers,
            # polars' thread pool does not survive fork(); spawn and keep the workers.
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            pin_memory=self._on_gpu(),  # TensorBatch.pin_memory: asynchronous copies
        )

    def _on_gpu(self) -> bool:
        """Whether the trainer runs on a GPU (batches then arrive in pinned memory)."""
        strategy = getattr(self.trainer, "strategy", None)
        return strategy is not None and strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
