"""``task_metrics`` over every rank's rows, exact, with no rank holding more than its share.

Each metric is rebuilt from parts that add up across shards of the right kind
(``ranker.metrics``):

* logloss, calibration, ECE, positive rate, count: sums over any rows (``additive_sums``),
  summed across ranks.
* GAUC = ``sum_u n_u AUC_u / sum_u n_u``: a user's AUC needs all of the user's rows, so rows
  are first sent to rank ``user mod world``; each rank's ``gauc_parts`` over its whole users
  are summed.
* AUC (Mann-Whitney): per task, rows are sent by score range (sample sort: splitters from
  every rank's score quantiles, equal scores to the same rank), so rank ``k`` holds the
  ``k``-th range. ``num = sum_k num_k + sum_k n_pos_k * (negatives on ranks below k)``.

* Uplift metrics (``sharded_uplift_metrics``): every rank gathers the rows they read.

Every rank returns the same metrics. Collectives run on the process group's device (CUDA
tensors for NCCL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ranker.metrics import additive_sums, auc_parts, by_task, finish, gauc_parts, task_rows
from ranker.uplift_metrics import uplift_metrics

SPLITTER_SAMPLE = 1024  # score quantiles each rank contributes to choose the AUC ranges


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (float64)."""
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def _gather(values: np.ndarray) -> np.ndarray:
    """``[world, *shape]``: every rank's ``values`` (float64, same shape on every rank)."""
    mine = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return torch.stack(every).cpu().numpy()


def _exchange(columns: Sequence[np.ndarray], rank_of_row: np.ndarray) -> list[np.ndarray]:
    """Send each row (of every column) to ``rank_of_row``; returns the rows this rank got."""
    world = dist.get_world_size()
    order = np.argsort(rank_of_row, kind="stable")
    send = np.bincount(rank_of_row, minlength=world)
    receive = _gather(send)[:, dist.get_rank()].astype(np.int64)
    received = []
    for column in columns:
        rows = torch.as_tensor(np.ascontiguousarray(column[order]), device=_device())
        out = rows.new_empty((int(receive.sum()), *rows.shape[1:]))
        dist.all_to_all_single(out, rows, receive.tolist(), send.tolist())
        received.append(out.cpu().numpy())
    return received


def _sharded_auc(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``auc_parts`` of the union of every rank's ``(p, y)``."""
    world = dist.get_world_size()
    ordered = np.sort(p)
    picks = np.linspace(0, len(p) - 1, SPLITTER_SAMPLE).round().astype(np.int64)
    sample = _gather(ordered[picks] if len(p) else np.full(SPLITTER_SAMPLE, np.nan))
    sample = np.sort(sample[~np.isnan(sample)])
    splitters = sample[np.linspace(0, len(sample), world + 1)[1:-1].astype(np.int64)]
    # side="right": equal scores land on the same rank, so no tie spans two ranges.
    p, y = _exchange([p, y], np.searchsorted(splitters, p, side="right"))
    order = np.argsort(p)
    parts = _gather(auc_parts(p[order], y[order] > 0.5))  # [world, (num, n_pos, n_neg)]
    below = np.cumsum(parts[:, 2]) - parts[:, 2]  # negatives on the ranks below each rank
    return np.array(
        [parts[:, 0].sum() + np.dot(parts[:, 1], below), parts[:, 1].sum(), parts[:, 2].sum()]
    )


def sharded_task_metrics(
    probs: np.ndarray, labels: np.ndarray, users: np.ndarray, tasks: Sequence[str]
) -> dict[str, float] | None:
    """``task_metrics`` of the rows of every rank of the default process group (each passes
    its own ``[N_r, T]`` probs / labels and ``[N_r]`` users); None when no rank has a row."""
    tasks = list(tasks)
    sums = [_sum(additive_sums(*task_rows(probs, labels, t)[:2])) for t in range(len(tasks))]
    if not any(s[0] for s in sums):
        return None
    # GAUC: each user's rows on one rank.
    by_user = _exchange([probs, labels, users], np.mod(users, dist.get_world_size()))
    probs_u, labels_u, users_u = by_user
    _, codes = np.unique(users_u, return_inverse=True)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    per_task = []
    for t, total in enumerate(sums):
        if not total[0] or total[4]:  # no rows, or NaN scores: no ranking metric
            per_task.append(finish(total, np.zeros(3), np.zeros(2)))
            continue
        p, y, which = task_rows(probs_u, labels_u, t)
        gauc = _sum(gauc_parts(p, y > 0.5, codes[which], n_groups) if len(p) else np.zeros(2))
        p, y, _ = task_rows(probs, labels, t)
        per_task.append(finish(total, _sharded_auc(p, y), gauc))
    return by_task(per_task, tasks)


def _gather_rows(columns: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every rank's rows of each column (the same trailing shape and dtype on every rank),
    concatenated in rank order, on every rank."""
    sizes = _gather(np.array([len(columns[0])]))[:, 0].astype(np.int64)
    top = int(sizes.max())
    gathered = []
    for column in columns:
        mine = torch.as_tensor(np.ascontiguousarray(column), device=_device())
        padded = mine.new_zeros((top, *mine.shape[1:]))
        padded[: len(mine)] = mine
        every = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(every, padded)
        parts = [e[:n].cpu().numpy() for e, n in zip(every, sizes, strict=True)]
        gathered.append(np.concatenate(parts))
    return gathered


def sharded_uplift_metrics(
    arm_probabilities: np.ndarray,
    labels: np.ndarray,
    treatment: np.ndarray,
    arms: Sequence[str],
    tasks: Sequence[str],
    propensity: np.ndarray,
) -> dict[str, float]:
    """``uplift_metrics`` of every rank's rows, exact, the same on every rank. Qini curves
    order all rows of an arm pair by score, so every rank gathers the rows the metrics read:
    ``A T + T + 2`` numbers per row (uplift data holds one row per customer: 10M customers,
    3 arms and 2 tasks are 0.4 GB per rank). ``propensity [N]`` (ones for randomised data)."""
    arm_probabilities, labels, treatment, propensity = _gather_rows(
        [arm_probabilities, labels, treatment, propensity]
    )
    logged = None if np.all(propensity == 1.0) else propensity
    return uplift_metrics(arm_probabilities, labels, treatment, arms, tasks, logged)
