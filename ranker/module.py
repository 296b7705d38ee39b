"""The LightningModule: masked multi-task BCE, sparse + dense optimisers, per-task metrics."""

from __future__ import annotations

import atexit
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from features.config import TaskSpec
from features.contract import ARM_OUTPUT, LOGITS, OUTPUT
from features.datamodule import TensorBatch
from features.state import LARGE_VOCABULARY, InputSpec, SequenceInput
from ranker.calibration import Calibrator, Method
from ranker.experts import Routing
from ranker.layers import (
    RENEWING,
    HistoryDropout,
    IdDropout,
    auto_id_dropout,
    deferred_tables,
    embedding_rates,
    renewing,
)
from ranker.loss import WEIGHTINGS, PCGrad, masked_bce
from ranker.metrics import task_metrics
from ranker.models.base import MultiTaskModel, Outputs
from ranker.scoring import Scored, batch_outputs, graph_outputs
from ranker.sharded_metrics import sharded_task_metrics, sharded_uplift_metrics
from ranker.sharding import (
    PREFIX,
    ShardedTables,
    budget,
    gather_rates,
    gather_state,
    load_local,
    optimizer_state,
    plan_lines,
    pop_tables,
    require_torchrec,
    set_rates,
    shard,
)
from ranker.uplift_metrics import uplift_metrics

# The checkpoint's hparams hold these plain dataclasses; let weights-only loading accept them.
torch.serialization.add_safe_globals([InputSpec, SequenceInput, TaskSpec, Routing])

NetworkFactory = Callable[[InputSpec, Sequence[TaskSpec]], MultiTaskModel]
Monitor = Literal["auto", "qini", "gauc", "auc", "logloss"]
# What checkpoint selection and early stopping compare, every validation: higher is better.
MONITOR = "val/monitor"
FALLBACK: tuple[str, ...] = ("gauc", "auc", "logloss")  # the order "auto" tries
UPLIFT_FALLBACK = ("qini", *FALLBACK)  # on uplift data: mean Qini first


def monitor_order(wanted: str, uplift: bool = False) -> tuple[str, ...]:
    """The metrics ``--model.monitor wanted`` tries, in order: the first defined is chosen."""
    fallback = UPLIFT_FALLBACK if uplift else FALLBACK
    return fallback if wanted == "auto" else (wanted, *(m for m in fallback if m != wanted))


def choose_monitor(wanted: str, metrics: dict[str, float]) -> str:
    """The monitored metric on this data: the first of ``monitor_order`` whose mean is
    defined in ``metrics`` (a validation's ``task_metrics``, with ``uplift_metrics`` on
    uplift data)."""
    order = monitor_order(wanted, "qini/mean" in metrics)
    return next((m for m in order if math.isfinite(metrics.get(f"{m}/mean", math.nan))), order[0])


def inverse(batch: TensorBatch) -> torch.Tensor | None:
    """Row weights of a batch of logged uplift data: the inverse of each row's propensity
    (None where the data is not logged: every row weighs the same)."""
    return None if batch.propensity is None else 1.0 / batch.propensity


def signed(metric: str, metrics: dict[str, float]) -> float:
    """The metric's mean, higher is better (logloss negated)."""
    value = metrics[f"{metric}/mean"]
    return -value if metric == "logloss" else value


class DenseAdam(torch.optim.Adam):
    """Adam on every row of the tables at every step (the sparse gradients made dense first):
    rows absent from a batch keep moving with their momentum, as in a dense-embedding model.
    Costs the whole table per step: for small vocabularies only."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.coalesce().to_dense()
        return super().step(closure)


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per embedding row, as TorchRec / FBGEMM
    (``EXACT_ROWWISE_ADAGRAD``) and DLRM train their tables. For row ``r`` with gradient
    ``g_r [D]`` in a step:

        G_r <- G_r + mean_d g_rd^2,        w_r <- w_r - lr * g_r / (sqrt(G_r) + eps)

    A row's rate falls with how often (and how strongly) it has moved: a rare id keeps large
    steps, a frequent one settles, so one learning rate holds from small vocabularies (every
    row in every batch) to huge ones. Sparse gradients move only the batch's rows; the state
    is one float per row (SparseAdam keeps two per element)."""

    def __init__(self, params: Any, lr: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows, values = torch.arange(p.shape[0], device=p.device), grad
                state["sum"].index_add_(0, rows, values.pow(2).mean(1))
                scale = state["sum"].index_select(0, rows).sqrt_().add_(eps).reciprocal_()
                p.index_add_(0, rows, values * scale.unsqueeze(1), alpha=-lr)
        return None


class RowRates:
    """Per-row learning rates for the embedding tables' optimiser: row ``r`` of a table moves
    by ``scale_r`` times the step the optimiser takes at its own rate,

        w_r <- w_r + scale_r * (step(w)_r - w_r),

    which is the step at rate ``lr * scale_r`` for every optimiser of ``EMBEDDING_OPTIMIZERS``
    (each step is proportional to its learning rate; the optimiser's state is unchanged).
    Only the rows the step moves are read and written: the batch's rows on sparse gradients,
    every row with ``every_row`` (dense ``adam``, whose momentum moves the others too)."""

    def __init__(
        self, tables: Sequence[nn.Embedding], scales: Sequence[torch.Tensor], every_row: bool
    ) -> None:
        self.every_row = every_row
        self.parts = [
            (table.weight, scale.to(table.weight))
            for table, scale in zip(tables, scales, strict=True)
            if not bool((scale == 1).all())
        ]

    def step(self, optimiser: torch.optim.Optimizer) -> None:
        moved = []
        for weight, scale in self.parts:
            grad = weight.grad
            if grad is None:
                continue
            if grad.is_sparse:  # coalesced once, here: the optimiser's coalesce is then free
                weight.grad = grad = grad.coalesce()
            rows = grad.indices()[0] if grad.is_sparse and not self.every_row else None
            before = weight.detach().clone() if rows is None else weight.detach()[rows]
            moved.append((weight, scale if rows is None else scale[rows], rows, before))
        optimiser.step()
        with torch.no_grad():
            for weight, scale, rows, before in moved:
                after = weight if rows is None else weight[rows]
                new = torch.lerp(before, after, scale.unsqueeze(1))
                if rows is None:
                    weight.copy_(new)
                else:
                    weight.index_copy_(0, rows, new)


def release_process_group() -> None:
    """Destroys the process group while the interpreter is whole. Lightning does so for NCCL
    only; a gloo group left to finalisation can abort the process (SIGABRT, ``terminate called
    without an active exception``) after a run that finished, e.g. 1 in 15 sharded runs here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sparse_adam": torch.optim.SparseAdam,
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": DenseAdam,
}


class RankerModule(L.LightningModule):
    """Trains any model of the zoo.

    Args:
        network: the model, given its inputs and tasks (``class_path`` of a zoo model in YAML).
        inputs: layout of the categorical / numeric inputs (linked from the DataModule).
        tasks: the tasks, in label order (linked from the DataModule).
        learning_rate: AdamW learning rate of the dense part.
        weight_decay: AdamW weight decay of the dense part.
        embedding_learning_rate: learning rate of the embedding rows of categorical features
            with a large vocabulary (more than 1,000 ids: each row is in few batches), the
            catalogue's aside; the rate the other rules are scales of.
        small_vocabulary_learning_rate: learning rate of the rows of every other categorical
            feature (at most 1,000 ids: rows in most batches, ``RowRates``); ``null`` (the
            default): ``embedding_learning_rate`` for every row. Not on by default: at 1e-3 it
            lifted Hillstrom (every vocabulary tiny) by +0.001 / +0.006 test mean AUC (HoME /
            MMoE) but cost KuaiRand, whose 664 users it slowed too, -0.022 / -0.037
            (``benchmarks/RESULTS.md``). The rates in force are printed at the start and logged
            (``model/embedding_rates_in_force``).
        catalogue_learning_rate: learning rate of the rows of the catalogue (item-side
            categorical features with more than 1,000 ids, the features ``id_dropout: auto``
            picks; ``InputSpec.catalogue``) where it renews: at least 20 % of the
            validation rows hold one of its ids with no row of its own (``renewing``, measured
            on the data and printed: ``catalogue: item_id, author_id (renews; ...)``);
            ``null``: as the others. There an item is in few rows, each epoch brings them back,
            and tomorrow's items are not in training. Default 0.01 (the others 0.05), against
            0.05 (test mean AUC / GAUC, 3 seeds, ``benchmarks/RESULTS.md``): KuaiRand
            (``video_id``, 53 % unseen) HoME +0.016 / +0.029, MMoE -0.003 / +0.003; the 1M-row
            log with new items (29 %) HoME +0.007 / +0.002, MMoE +0.005 / +0.009. Where the
            catalogue stays it keeps 0.05: on the demo's log (8 %) 0.01 cost HoME -0.007 /
            -0.006 and MMoE -0.009 / -0.013. Its limit, on a log held out for the rule (the
            demo's shape, 30 % new items: 23 % unseen, so it renews): HoME -0.004 / -0.008,
            MMoE -0.001 / +0.002.
        feature_learning_rates: feature name -> the learning rate of its rows, over the rules
            above, e.g. ``{user_id: 0.01}``.
        embedding_optimizer: the embedding tables' optimiser, on sparse gradients (only the
            rows in the batch move): ``sparse_adam``; ``rowwise_adagrad`` (one accumulated
            squared gradient per row, as TorchRec and DLRM: a row's rate falls as it is seen,
            ``RowWiseAdagrad``); ``adagrad`` (accumulated squared gradients per element, no
            first moment: half SparseAdam's optimiser state); or ``adam``, dense Adam over
            every row at every step (small vocabularies only).
        lr_schedule: ``none``, or ``plateau``: both learning rates halve after a validation
            whose monitored metric did not improve.
        gradient_clip: max global norm of the dense gradients (0 = off).
        loss_weighting: how the tasks' losses are balanced in training (``ranker.loss``):
            ``fixed`` (the dataset's task weights), ``uncertainty`` (learned per task, Kendall
            et al. 2018, on top of the dataset's) or ``pcgrad`` (the fixed weights, with
            conflicting task gradients projected apart on the shared parameters, Yu et al.
            2020; one backward pass per task; single process only). The weights are logged
            every epoch (``train/task_weight/<task>``); PCGrad also logs the share of task
            pairs in conflict (``train/pcgrad/conflicts``). Validation losses always use the
            fixed weights.
        calibration: per-task post-hoc calibration fitted on validation after training
            (``ranker.calibration``: ``platt``, ``temperature`` or ``none``); evaluation, export
            and the service use the calibrated probabilities.
        monitor: the validation metric that picks the best checkpoint and stops training
            early, logged as ``val/monitor`` (higher is better): the mean across tasks of
            ``qini`` (uplift data: over tasks and arms), ``gauc``, ``auc`` or ``logloss``
            (negated). ``auto``: on uplift data mean Qini, else mean GAUC where the data
            defines it (users with both classes), else mean AUC. A chosen metric that is
            undefined on the data falls back (GAUC, AUC, logloss) with a warning. The metric
            is chosen at the first validation, printed, logged as the param
            ``selection/metric``, and kept for the run (and its resumptions).
        id_dropout: feature name -> share of training rows whose id is replaced by the
            unknown index (``ranker.layers.IdDropout``), e.g. ``{video_id: 0.1}``: the unknown
            row then stands for a new id. ``auto`` (the default): 0.1 on every item-side
            categorical feature with more than 1,000 ids (``ranker.layers.auto_id_dropout``),
            none elsewhere; ``{}``: none. The shares in force are printed at the start.
        history_dropout: share of the behaviours of every sequence replaced by padding in
            training (``ranker.layers.HistoryDropout``); 0 (the default): none.
        history_dropout_recent: share of each row's behaviours dropped in training from the
            recent end (on average; ``HistoryDropout``), as a test split's latest behaviours
            are of items the vocabulary does not know yet; 0 (the default): none.
        history_trains_embeddings: whether the pooled histories train the embedding rows they
            share with the candidates (True, the default); False: only the candidates do.
        sharding: ``none`` (the default): every process holds every embedding table (under
            DDP, each rank a replica); ``torchrec``: under ``torchrun`` with 2+ processes, the
            tables are sharded across the ranks by TorchRec (``ranker.sharding``), their
            optimiser (``rowwise_adagrad`` or ``adagrad``; ``sparse_adam`` on GPUs) fused into
            the backward pass, the dense part under DDP. The plan is printed and logged
            (``sharding_plan.txt``); the checkpoint holds whole tables, as any run's.
        sharding_type: how TorchRec may place each table: ``table_wise`` (the default: whole
            tables spread over the ranks), ``row_wise``, ``column_wise``, or ``auto`` (its
            planner's choice).
        sharding_budget_gb: memory per rank the plan must fit (tables and their optimiser
            state; null: the machine's). No plan fits: an error naming the tables and sizes.
        compile: train with the dense part after the embedding lookup compiled
            (``torch.compile``; the lookup's sparse gradients do not compile), its code cached
            on disk across runs (``$RANKER_CACHE/inductor``); validation runs eager. Off by
            default: it speeds the step up, but a whole ``ranker fit`` epoch only breaks even
            once the compiled code is cached (the figures: ``benchmarks/RESULTS.md``).
    """

    def __init__(
        self,
        network: NetworkFactory,
        inputs: InputSpec | None = None,
        tasks: Sequence[TaskSpec] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-5,
        embedding_learning_rate: float = 5e-2,
        small_vocabulary_learning_rate: float | None = None,
        catalogue_learning_rate: float | None = 1e-2,
        feature_learning_rates: dict[str, float] | None = None,
        embedding_optimizer: Literal[
            "sparse_adam", "rowwise_adagrad", "adagrad", "adam"
        ] = "sparse_adam",
        lr_schedule: Literal["none", "plateau"] = "none",
        gradient_clip: float = 0.0,
        monitor: Monitor = "auto",
        loss_weighting: Literal["fixed", "uncertainty", "pcgrad"] = "fixed",
        calibration: Method = "platt",
        id_dropout: dict[str, float] | Literal["auto"] | None = "auto",
        history_dropout: float = 0.0,
        history_dropout_recent: float = 0.0,
        history_trains_embeddings: bool = True,
        sharding: Literal["none", "torchrec"] = "none",
        sharding_type: Literal["table_wise", "row_wise", "column_wise", "auto"] = "table_wise",
        sharding_budget_gb: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if inputs is None or tasks is None:
            raise ValueError("RankerModule needs inputs and tasks (linked from the DataModule)")
        # Everything needed to rebuild the model goes in the checkpoint; the CLI logs the
        # resolved config to MLflow itself (the logger would truncate these reprs).
        self.save_hyperparameters(logger=False)
        self.inputs, self.tasks = inputs, tuple(tasks)
        with deferred_tables() if sharding == "torchrec" else nullcontext():
            self.network = network(inputs, self.tasks)  # tables about to be sharded: unwritten
        self.register_buffer("task_weights", torch.tensor([t.weight for t in self.tasks]))
        self.weighting = WEIGHTINGS[loss_weighting](self.task_weights)
        self.calibrator = Calibrator(len(self.tasks))  # the identity until fitted
        shares = auto_id_dropout(inputs) if id_dropout == "auto" else (id_dropout or {})
        self.id_dropout = IdDropout(inputs.cat_names, shares)
        self.id_dropout_shares = shares
        self.history_dropout = HistoryDropout(history_dropout, history_dropout_recent)
        self.network.pooling.trains_embeddings = history_trains_embeddings
        if embedding_learning_rate <= 0:  # the other rates are scales of this one
            raise ValueError(
                f"--model.embedding_learning_rate must be > 0, got {embedding_learning_rate}"
            )
        self.embedding_rates = embedding_rates(
            inputs,
            embedding_learning_rate,
            small_vocabulary_learning_rate,
            catalogue_learning_rate,
            feature_learning_rates,
        )
        self.automatic_optimization = False  # two optimisers: sparse rows and dense weights
        self._scores: dict[str, Scored] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._epoch_start = self._last_batch_end = 0.0
        self._epoch_samples = 0
        self._task_loss_sum = torch.zeros(len(self.tasks))
        self.selected: str | None = None  # the monitored metric, chosen at first validation
        self._seed = 0  # the run's seed, read at the start of fit (id dropout's draws)
        self._fused_state: dict[str, Any] | None = None  # their optimiser state to restore

    @property
    def sharded(self) -> bool:
        """Whether the tables are sharded by TorchRec (``configure_model``)."""
        return isinstance(self.network.embedding, ShardedTables)

    @property
    def fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def forward(
        self, cat: torch.Tensor, num: torch.Tensor, sequences: dict[str, torch.Tensor] | None = None
    ) -> Outputs:
        return self.network(cat, num, sequences)

    # -- training -----------------------------------------------------------------------------

    def split_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The network's (dense, sparse) parameters: sparse = the embedding tables."""
        sparse = list(self.network.embedding.parameters())
        sparse_ids = {id(p) for p in sparse}
        return [p for p in self.network.parameters() if id(p) not in sparse_ids], sparse

    def configure_optimizers(self) -> Any:
        dense, sparse = self.split_parameters()
        groups = [{"params": dense}]
        learned = list(self.weighting.parameters())  # learned task weights: no weight decay
        groups += [{"params": learned, "weight_decay": 0.0}] if learned else []
        hp = self.hparams
        adamw = torch.optim.AdamW(
            groups, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=True
        )
        if self.sharded:  # each table's optimiser runs in its backward, at its feature's rate
            optimisers = [adamw, self.network.embedding.fused_optimizer()]
            self.row_rates = RowRates([], [], every_row=False)
        else:
            embedding = EMBEDDING_OPTIMIZERS[hp.embedding_optimizer]
            optimisers = [adamw, embedding(sparse, lr=hp.embedding_learning_rate)]
            scales = [r / hp.embedding_learning_rate for r in self.embedding_rates.values()]
            tables = self.network.embedding
            every_row = embedding is DenseAdam
            self.row_rates = RowRates(tables.tables, tables.per_row(scales), every_row)
        if hp.lr_schedule == "none":
            return optimisers
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        return optimisers, [
            plateau(o, mode="max", factor=0.5, patience=0, threshold=0) for o in optimisers
        ]

    def configure_model(self) -> None:
        """With ``sharding: torchrec``, when fitting: the tables sharded across the process
        group (every rank, before DDP wraps the module; DDP then skips them)."""
        if self.sharded:
            return
        if self.hparams.get("sharding", "none") == "none" or not self.fitting:
            # e.g. a sharded run's checkpoint loaded to score: whole tables, one process
            self.network.embedding.initialise()  # a no-op once written (or loaded)
            return
        if self.trainer.world_size < 2:
            raise ValueError(
                "--model.sharding torchrec shards the tables across processes: run under "
                "torchrun with 2+ processes (--trainer.devices N --trainer.strategy ddp), or "
                "leave it off (one process holds every table)"
            )
        if str(self.trainer.precision).startswith("16"):
            raise ValueError(
                "--model.sharding torchrec applies the tables' optimiser inside the backward, "
                "before the fp16 loss scaler could unscale or skip a step: train in 32 or bf16"
            )
        require_torchrec()
        hp, device = self.hparams, self.trainer.strategy.root_device
        tables = ShardedTables(self.network.embedding, self.inputs)
        gigabytes = budget(device, hp.sharding_budget_gb)
        planned = shard(
            tables, self.embedding_rates, hp.embedding_optimizer, hp.sharding_type, gigabytes,
            device,
        )  # fmt: skip
        self.network.embedding = tables
        names = [n for n, _ in [*self.named_parameters(), *self.named_buffers()]]
        ignored = [n for n in names if n.startswith(PREFIX)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)
        text = plan_lines(planned, self.trainer.world_size, gigabytes)
        if self.trainer.is_global_zero:
            print(text, flush=True)
            logger = self.logger
            if logger is not None and hasattr(logger, "run_id") and logger.run_id:
                logger.experiment.log_text(logger.run_id, text, "sharding_plan.txt")

    def _start_clock(self) -> None:
        self._epoch_start, self._epoch_samples = time.perf_counter(), 0
        self._task_loss_sum = torch.zeros(len(self.task_names), device=self.device)
        self._last_batch_end = self._epoch_start

    def compile_network(self) -> None:
        """With ``compile``: the network's dense part compiled for the training steps."""
        if self.hparams.get("compile"):
            self.network.compile_dense()

    def setup(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            atexit.unregister(release_process_group)  # once, however many stages ran
            atexit.register(release_process_group)

    def on_fit_start(self) -> None:
        self._seed = torch.initial_seed() % 2**31  # the run's seed (seed_everything)
        self.compile_network()
        self.announce_rules()
        if not isinstance(self.weighting, PCGrad):
            return
        if self.trainer.world_size > 1:
            raise ValueError(
                "--model.loss_weighting pcgrad runs in one process only: its per-task "
                "gradients bypass DDP's gradient reduction (use fixed or uncertainty)"
            )
        if str(self.trainer.precision).startswith("16"):
            raise ValueError(
                "--model.loss_weighting pcgrad takes its gradients outside the fp16 loss "
                "scaler: train in 32 or bf16 precision"
            )

    def _rate_rules(self) -> str:
        """The rules behind the embedding rates, as ``announce_rules`` prints them."""
        hp, rules = self.hparams, []
        catalogued, small = hp.catalogue_learning_rate, hp.small_vocabulary_learning_rate
        if catalogued is not None:
            renews = f"{RENEWING:.0%}+ of validation rows unseen"
            rules.append(f"item-side over {LARGE_VOCABULARY:,} ids, {renews}, at {catalogued:g}")
        if small is not None:
            rules.append(f"at most {LARGE_VOCABULARY:,} ids at {small:g}")
        if hp.feature_learning_rates:
            rules.append("named ones at their own")
        return f" ({'; '.join(rules)})" if rules else ""

    def _catalogue(self) -> str:
        """The catalogue's features, the share of validation rows each does not know, and
        whether it renews."""
        features = self.inputs.catalogue
        if not features:
            return f"none (no item-side feature over {LARGE_VOCABULARY:,} ids)"
        unseen = dict(zip(self.inputs.cat_names, self.inputs.cat_unseen, strict=False))
        if not unseen:
            return f"{', '.join(features)} (not measured, no validation rows: taken to renew)"
        shares = ", ".join(
            f"{n} {'not measured (hashed)' if unseen[n] is None else f'{unseen[n]:.1%}'}"
            for n in features
        )
        renews = "renews" if renewing(self.inputs) else "stays"
        return f"{', '.join(features)} ({renews}; validation rows unseen: {shares})"

    def announce_rules(self) -> None:
        """Prints and logs what the default rules over the vocabularies chose for this data."""
        shares = ", ".join(f"{k} {v:g}" for k, v in self.id_dropout_shares.items()) or "none"
        auto = f" (auto: item-side features over {LARGE_VOCABULARY:,} ids)"
        rule = auto if self.hparams.id_dropout == "auto" else ""
        by_rate: dict[float, list[str]] = {}
        for name, rate in self.embedding_rates.items():
            by_rate.setdefault(rate, []).append(name)
        rates = "; ".join(f"{r:g} for {', '.join(by_rate[r])}" for r in sorted(by_rate)[::-1])
        if self.trainer.is_global_zero:
            print(f"catalogue: {self._catalogue()}", flush=True)
            print(f"id dropout{rule}: {shares}", flush=True)
            print(f"embedding learning rates{self._rate_rules()}: {rates}", flush=True)
        if self.logger is not None:
            self.logger.log_hyperparams(
                {"model/id_dropout_in_force": shares, "model/embedding_rates_in_force": rates}
            )

    def on_fit_end(self) -> None:
        self.network.eager()  # evaluation, calibration and export run the eager modules

    def on_train_start(self) -> None:
        self._start_clock()  # a run resumed mid-epoch gets no on_train_epoch_start
        if self._fused_state is not None and self.fitting:
            self._restore_fused(self._fused_state)
        self._fused_state = None

    def _restore_fused(self, saved: dict[str, Any]) -> None:
        """A resumed sharded run's tables' optimiser state and rates, as saved; the state
        only under the plan it was saved with (column-wise state is laid out by the plan)."""
        fused, plan = self.trainer.optimizers[1], self.network.embedding.plan
        set_rates(fused, saved["lr"])
        if saved["plan"] != plan:
            kinds = {kind for p in (saved["plan"], plan) for kind, _ in p.values()}
            if "column_wise" in kinds:
                raise ValueError(
                    "this checkpoint's tables were sharded column-wise by another plan; resume "
                    "with its ranks and --model.sharding_type"
                )
        load_local(optimizer_state(fused), saved["state"])

    def on_validation_epoch_start(self) -> None:
        self.network.use_compiled(False)  # validation runs eager (``compile``)

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)
        self._start_clock()
        dense_opt, sparse_opt = self.optimizers()  # the learning rates this epoch trains with
        self.log("train/lr", dense_opt.param_groups[0]["lr"])
        self.log("train/embedding_lr", sparse_opt.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self._last_batch_end = time.perf_counter()

    def training_step(self, batch: TensorBatch, batch_idx: int) -> torch.Tensor:
        labels = batch.labels
        cat, num, sequences = batch.inputs
        seed = self._seed * 1_000_003 + self.global_step  # the same draws when resumed
        cat = self.id_dropout(cat, seed)
        sequences = self.history_dropout(sequences, seed)
        outputs, auxiliary = self.network.training_forward(cat, num, sequences, batch.treatment)
        _, per_task = masked_bce(outputs[LOGITS], labels, self.task_weights, inverse(batch))
        present = (~torch.isnan(labels)).any(0)
        extra = sum(auxiliary.values(), torch.zeros((), device=labels.device))
        loss = self.weighting(per_task, present) + extra
        dense_opt, sparse_opt = self.optimizers()
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        if isinstance(self.weighting, PCGrad):
            self.weighting.backward(per_task, present, *self.split_parameters(), extra=extra)
            conflicts = self.weighting.last_conflicts
            self.log("train/pcgrad/conflicts", conflicts, on_epoch=True, batch_size=1)
        else:
            self.manual_backward(loss)
        if self.hparams.gradient_clip:
            self.clip_gradients(dense_opt, gradient_clip_val=self.hparams.gradient_clip)
        dense_opt.step()
        self.row_rates.step(sparse_opt)
        self._epoch_samples += len(labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        if auxiliary:
            aux = {f"train/aux/{k}": v for k, v in auxiliary.items()}
            self.log_dict(aux, on_epoch=True, batch_size=1)
        # Summed here, logged once an epoch: a Lightning ``log`` call costs ~0.5 ms on CPU
        # (eight a step cost MMoE's ``ranker fit`` 2-4%).
        self._task_loss_sum = self._task_loss_sum + per_task.detach() * len(labels)
        return loss

    def on_train_epoch_end(self) -> None:
        # Up to the last training batch: Lightning runs validation before this hook.
        seconds = self._last_batch_end - self._epoch_start
        weights = self.weighting.current()
        self.log_dict(
            {f"train/task_weight/{n}": w for n, w in zip(self.task_names, weights, strict=True)}
        )
        if self._epoch_samples:  # each task's mean training loss over the epoch
            means = self._task_loss_sum / self._epoch_samples
            self.log_dict(
                {f"train/loss/{n}": v for n, v in zip(self.task_names, means, strict=True)},
                sync_dist=True,
            )
        if seconds > 0 and self._epoch_samples:
            self.log("train/samples_per_sec", self._epoch_samples / seconds)
            self.log("train/epoch_seconds", seconds)

    # -- evaluation ---------------------------------------------------------------------------

    def _collect(self, stage: str, batch: TensorBatch) -> None:
        outputs = batch_outputs(self.network, batch)
        logits = self.calibrator(outputs[LOGITS])
        loss, _ = masked_bce(logits, batch.labels, self.task_weights, inverse(batch))
        self.log(f"{stage}/loss", loss, batch_size=len(batch), sync_dist=True)
        if stage not in self._scores:
            self._scores[stage] = Scored(self._planned_rows(stage, len(batch)))
        self._scores[stage].add(graph_outputs(outputs, self.calibrator), batch)

    def _planned_rows(self, stage: str, batch_rows: int) -> int:
        """Rows this rank will score: its batches times the first's size (the largest)."""
        trainer = self.trainer
        batches = trainer.num_val_batches
        if stage == "test":
            batches = trainer.num_test_batches
        elif trainer.sanity_checking:
            batches = trainer.num_sanity_val_batches
        total = sum(batches)
        return batch_rows * int(total) if math.isfinite(total) else batch_rows

    def _report(self, stage: str) -> None:
        # A rank that read no row group of the split still joins the collectives, with no rows.
        scores = self._scores.pop(stage, None) or Scored()
        probs, users = scores.output(OUTPUT, len(self.tasks)), scores.users
        labels = scores.labels.reshape(-1, len(self.tasks))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Exact under DDP (GAUC's users span ranks), no rank holding more than its share.
            metrics = sharded_task_metrics(probs, labels, users, self.task_names)
        else:
            metrics = task_metrics(probs, labels, users, self.task_names) if len(probs) else None
        if metrics is None:
            return
        if self.inputs.arms:
            metrics |= self._uplift(scores)
        self.last_metrics[stage] = metrics
        loggable = {f"{stage}/{k}": v for k, v in metrics.items() if not k.startswith("count/")}
        headline = f"{stage}/gauc/mean"
        if stage == "val":
            loggable[MONITOR] = self._monitored(metrics)
            self._schedule(loggable[MONITOR])
        # Every rank holds the same metrics: no reduction needed (nor warned about).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            self.log(headline, loggable.pop(headline), prog_bar=True)
            self.log_dict(loggable)

    def _uplift(self, scores: Scored) -> dict[str, float]:
        """Qini, AUUC and uplift at 10 / 30 % per task and arm against control (over every
        rank's rows under DDP)."""
        tasks, arms = len(self.tasks), self.inputs.arms
        probabilities = scores.output(ARM_OUTPUT, tasks).reshape(-1, len(arms), tasks)
        labels, treatment = scores.labels.reshape(-1, tasks), scores.treatment
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            propensity = scores.propensity
            if propensity is None:  # this rank's rows are all randomised: weigh 1 each
                propensity = np.ones(len(treatment), np.float32)
            return sharded_uplift_metrics(
                probabilities, labels, treatment, arms, self.task_names, propensity
            )
        return uplift_metrics(
            probabilities, labels, treatment, arms, self.task_names, scores.propensity
        )

    def _monitored(self, metrics: dict[str, float]) -> float:
        """``val/monitor`` of this validation; the metric is chosen at the first one."""
        if self.selected is None:
            wanted = self.hparams.monitor
            order = monitor_order(wanted, "qini/mean" in metrics)
            chosen = choose_monitor(wanted, metrics)
            if chosen != order[0]:
                rank_zero_warn(
                    f"val mean {order[0].upper()} is undefined on this data (e.g. no user has "
                    f"both classes for GAUC): the best checkpoint and early stopping use val "
                    f"mean {chosen.upper()} instead (set --model.monitor to choose)"
                )
            if self.trainer.sanity_checking:  # a few batches: choose on the real validation
                return signed(chosen, metrics)
            self.selected = chosen
            rank_zero_info(f"checkpoints and early stopping: val mean {chosen.upper()}")
            if self.logger is not None:
                self.logger.log_hyperparams({"selection/metric": f"val/{chosen}/mean"})
        value = signed(self.selected, metrics)
        if not math.isfinite(value):
            rank_zero_warn(f"val mean {self.selected.upper()} is NaN this epoch: not a best")
            value = -math.inf
        return value

    def _schedule(self, monitored: float) -> None:
        """Steps the plateau schedules on a validation of training (not of the best model)."""
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step(monitored)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["selected_metric"] = self.selected
        if self.sharded:
            self._save_whole_tables(checkpoint)

    def _save_whole_tables(self, checkpoint: dict[str, Any]) -> None:
        """A sharded run's checkpoint as any run's (every rank takes part; rank 0 writes):
        whole tables in the fused layout, and per table its optimiser state, gathered."""
        state, tables = checkpoint["state_dict"], self.network.embedding
        whole = tables.gather_fused(pop_tables(state))
        state.update({PREFIX + k: v for k, v in whole.items()})
        if "optimizer_states" not in checkpoint:  # weights only
            return
        fused = self.trainer.optimizers[1]
        checkpoint["optimizer_states"] = checkpoint["optimizer_states"][:1]  # the dense one
        checkpoint["sharded_optimizer"] = {
            "state": gather_state(optimizer_state(fused)),
            "lr": gather_rates(fused),
            "plan": tables.plan,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.selected = checkpoint.get("selected_metric")
        state = checkpoint.get("state_dict", {})
        self._load_tables(checkpoint, state)
        for key, value in self.calibrator.state_dict().items():  # written before calibration
            state.setdefault(f"calibrator.{key}", value)

    def _load_tables(self, checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
        """Sharded: the whole tables load into this rank's shards, their optimiser state is
        restored when training starts. Either way, a checkpoint of the other kind restores
        the dense optimiser only (said once)."""
        sharded_checkpoint = "sharded_optimizer" in checkpoint
        if self.sharded:
            tables = self.network.embedding.from_fused(pop_tables(state))
            state.update({PREFIX + k: v for k, v in tables.items()})
            self._fused_state = checkpoint.get("sharded_optimizer") if self.fitting else None
            checkpoint["optimizer_states"] = checkpoint.get("optimizer_states", [])[:1]
        if self.fitting and self.sharded != sharded_checkpoint:
            kind = "sharded" if sharded_checkpoint else "replicated"
            rank_zero_warn(f"the checkpoint's tables were {kind}: their optimiser state starts "
                           "fresh in this run (the dense optimiser's is restored)")  # fmt: skip

    def validation_step(self, batch: TensorBatch, batch_idx: int) -> None:
        self._collect("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")
        self.network.use_compiled(True)  # training resumes compiled (a no-op when not compiling)

    def test_step(self, batch: TensorBatch, batch_idx: int) -> None:
        self._collect("test", batch)

    def on_test_epoch_end(self) -> None:
        self._report("test")
