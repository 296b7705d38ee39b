"""Embedding tables sharded across processes by TorchRec (``--model.sharding torchrec``).

One process holds the whole fused table (``FusedEmbedding``) with its optimiser state: at 16
fp32 dimensions and Adam's two moments, ~10^8 ids is ~19 GB per DDP rank. Sharded, each rank
holds its share of the tables and of their optimiser state; TorchRec's planner places the
tables within a per-rank memory budget, FBGEMM's fused kernels run the lookup and apply the
optimiser inside the backward pass; the dense part stays under DDP.

``ShardedTables`` gives the network the ``FusedEmbedding`` interface (``forward``, ``lookup``)
over a TorchRec ``EmbeddingCollection`` of one table per categorical feature
(``t_<feature>``; sequences read their vocabulary's table). Each step makes **one** lookup:
per table, the unique ids the step may read (the feature's column, the sequences in its
vocabulary, and the unknown / padding index 0), sent as one ``KeyedJaggedTensor`` in which
each table's ids are one bag (stride 1, so ranks whose batches differ by a row take part
alike). The rows come back ``[U_t, D]`` and every read indexes them, so a table's gradient
is summed over all its reads before its one fused optimiser step, as one process's sparse
gradient is. TorchRec divides the tables' gradients by the world size and DDP averages the
dense ones: two ranks take the step one process takes on both ranks' rows.

The checkpoint holds whole tables in ``FusedEmbedding``'s layout (``gather_fused``, gathered
on rank 0), and the tables' optimiser state per table: evaluation, export, prediction,
serving and warm starts take a sharded run as any run, and a sharded run resumes from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from features.state import InputSpec
from ranker.layers import FusedEmbedding, fill_rows

# The pins that load together with torch 2.13 (CPU); --no-deps: torchrec's metadata asks for
# the CUDA fbgemm-gpu, whose module shadows the CPU one. The file is the one place they live.
INSTALL = (
    "pip install -c constraints.txt -e '.[torchrec]' && "
    "pip install --no-deps -r requirements-torchrec.txt"
)
# What FBGEMM fuses into the backward for each --model.embedding_optimizer (CPU: no Adam).
FUSED = {"rowwise_adagrad": "RowWiseAdagrad", "adagrad": "Adagrad", "sparse_adam": "Adam"}
PREFIX = "network.embedding."  # the sharded tables' place in the LightningModule


def require_torchrec() -> None:
    """Imports TorchRec, or says how to install it."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError) as error:
        raise ImportError(
            f"--model.sharding torchrec needs TorchRec and FBGEMM ({error}); install them: "
            f"{INSTALL}"
        ) from error


def table_name(feature: str) -> str:
    return f"t_{feature}"


class ShardedTables(nn.Module):
    """``FusedEmbedding``'s training interface over TorchRec tables, one per categorical
    feature, holding ``fused``'s current rows. ``fetch(cat, sequences)`` makes the step's one
    lookup; ``forward(cat, num)`` ``[B, sum D_f + F_num]`` (``fused``'s layout) and
    ``lookup(feature, ids)`` ``[..., D_f]`` read its rows. Scoring split per request
    (``embed_columns``) runs on whole tables after training, never here."""

    def __init__(self, fused: FusedEmbedding, inputs: InputSpec) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.names, self.cardinalities = tuple(inputs.cat_names), tuple(inputs.cardinalities)
        self.dims, self.output_dim = fused.dims, fused.output_dim
        self.order = sorted(range(len(self.names)), key=lambda f: fused.output_starts[f])
        vocabulary = {s.name: self.names.index(s.vocabulary) for s in inputs.sequences}
        self.sequences_of = [
            [s for s, v in vocabulary.items() if v == f] for f in range(len(self.names))
        ]
        # One collection per embedding width (TorchRec's collections are of one width).
        self.collections = nn.ModuleDict()
        for width in sorted(set(self.dims)):
            configs = [
                EmbeddingConfig(
                    name=table_name(name),
                    embedding_dim=dim,
                    num_embeddings=rows,
                    feature_names=[name],
                )
                for name, dim, rows in zip(self.names, self.dims, inputs.cardinalities, strict=True)
                if dim == width
            ]
            self.collections[f"d{width}"] = EmbeddingCollection(
                tables=configs, device=torch.device("meta")
            )
        # The fused layout (``FusedEmbedding``): feature f's rows start at row ``start`` of
        # table ``t`` (``rows_of[f]``); the checkpoint keeps the tables in it.
        self.rows_of = list(fused.rows_of)
        self.fused_shapes = [tuple(t.weight.shape) for t in fused.tables]
        # Rows to load once sharded (views of ``fused``'s, e.g. a warm start's); None: each
        # shard draws its own initial rows (``fused`` deferred, never written whole).
        self.initial = None
        if fused.initialised:
            self.initial = self.from_fused(fused.state_dict())
        self.init_seed, self.init_std = fused.init_seed, fused.init_std
        self.device: torch.device | None = None  # where the shards live, once sharded
        self.plan: dict[str, tuple[str, tuple[int, ...]]] = {}  # table: (sharding, ranks)
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # the step's rows per feature
        self._given: tuple[torch.Tensor, ...] = ()  # the tensors they were fetched for

    def key(self, feature: int) -> str:
        """Feature ``feature``'s table in this module's state dict."""
        return (
            f"collections.d{self.dims[feature]}.embeddings.{table_name(self.names[feature])}.weight"
        )

    def from_fused(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``FusedEmbedding``'s ``tables.<t>.weight`` as this module's tables (views)."""
        return {
            self.key(f): state[f"tables.{t}.weight"][start : start + self.cardinalities[f]]
            for f, (t, start) in enumerate(self.rows_of)
        }

    def gather_fused(self, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """This module's sharded ``state`` (``{key(f): ShardedTensor}``) as whole tables in
        ``FusedEmbedding``'s layout on rank 0 (in host memory), ``{}`` elsewhere (a collective,
        on the shards' device). Table by table: besides the whole tables, rank 0 holds one
        table's gather buffers at a time (TorchRec's: a shard's size per rank)."""
        rank0 = dist.get_rank() == 0
        tables = [torch.empty(shape) if rank0 else None for shape in self.fused_shapes]
        for f, (t, start) in enumerate(self.rows_of):
            sharded, table = state[self.key(f)], tables[t]
            out = None if table is None else torch.empty(sharded.size(), device=self.device)
            sharded.gather(dst=0, out=out)
            if table is not None:
                table[start : start + self.cardinalities[f]] = out.cpu()
        return {f"tables.{t}.weight": table for t, table in enumerate(tables) if table is not None}

    def fetch(self, cat: torch.Tensor, sequences: Mapping[str, torch.Tensor] | None) -> None:
        """The step's one lookup (a collective: every rank calls it, in step); nothing when
        given the tensors of the last fetch (a model may fetch before ``embed`` does)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        given = (cat, *(sequences or {}).values())
        if len(given) == len(self._given) and all(
            a is b for a, b in zip(given, self._given, strict=True)
        ):
            return
        self._given = given
        zero = cat.new_zeros(1)
        self._rows = [None] * len(self.names)  # type: ignore[list-item]
        for key, collection in self.collections.items():
            features = [f for f, d in enumerate(self.dims) if f"d{d}" == key]
            unique = []
            for f in features:
                reads = [zero, cat[:, f]]
                reads += [
                    sequences[s].flatten() for s in self.sequences_of[f] if s in (sequences or {})
                ]
                unique.append(torch.unique(torch.cat(reads)))
            lengths = torch.tensor([len(u) for u in unique], dtype=torch.int32, device=cat.device)
            names = [self.names[f] for f in features]
            ids = KeyedJaggedTensor(names, torch.cat(unique), lengths=lengths)
            if torch.is_inference_mode_enabled():  # FBGEMM's CPU lookup has no such kernel
                with torch.inference_mode(False), torch.no_grad():
                    out = collection(ids)
            else:
                out = collection(ids)
            for f, u, name in zip(features, unique, names, strict=True):
                self._rows[f] = (u, out[name].values())

    def fused_optimizer(self) -> Any:
        """The optimiser the backward applies to every table, as one ``KeyedOptimizer``
        (``step`` only sets its learning rates; ``param_groups`` schedule them)."""
        from torchrec.optim.keyed import CombinedOptimizer

        return CombinedOptimizer([(k, m.fused_optimizer) for k, m in self.collections.items()])

    def lookup(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            raise RuntimeError("ShardedTables read before fetch(cat, sequences) for the step")
        unique, rows = self._rows[feature]
        index = torch.searchsorted(unique, ids).clamp_(max=len(unique) - 1)
        if not bool((unique[index] == ids).all()):
            raise RuntimeError(
                f"ids of {self.names[feature]} read that the step did not fetch (only the "
                "feature's column, the sequences in its vocabulary and 0 are fetched)"
            )
        return nn.functional.embedding(index, rows)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        return torch.cat([*(self.lookup(f, cat[:, f]) for f in self.order), num], dim=1)


def pop_tables(state: dict[str, Any]) -> dict[str, Any]:
    """The tables' entries of a ``RankerModule`` state dict, removed from it, keyed as in
    the embedding module's own (``PREFIX`` dropped)."""
    return {k.removeprefix(PREFIX): state.pop(k) for k in list(state) if k.startswith(PREFIX)}


def initialise_shards(tables: ShardedTables) -> None:
    """Each rank's shards of every table drawn as ``FusedEmbedding.initialise`` draws those
    rows (``fill_rows``), without the rest of the table."""
    state = tables.state_dict()
    with torch.no_grad():
        for f, rows in enumerate(tables.cardinalities):
            for s in state[tables.key(f)].local_shards():
                first_row, first_column = s.metadata.shard_offsets
                shape = (rows, tables.dims[f])
                fill_rows(
                    s.tensor, tables.init_seed, f, shape, tables.init_std, first_row, first_column
                )


def gather_state(tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Whole tensors of an optimiser's ``{key: ShardedTensor}`` (each rank holds the state of
    its own tables: keys differ by rank) on rank 0, ``{}`` on the others (a collective)."""
    local = {
        key: (
            tuple(value.size()),
            [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in value.local_shards()],
        )
        for key, value in tensors.items()
    }
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    whole: dict[str, torch.Tensor] = {}
    for part in parts or []:
        for key, (size, shards) in part.items():
            out = whole.setdefault(
                key, torch.zeros(size, dtype=shards[0][1].dtype if shards else torch.float32)
            )
            for offsets, tensor in shards:
                out[_slices(offsets, tensor.shape)] = tensor
    return whole


def table_rates(optimizer: Any) -> dict[str, float]:
    """Each of this rank's tables' learning rate in a fused optimiser, by table key."""
    keys = {id(p): k for k, p in optimizer.params.items()}
    return {
        keys[id(p)]: group["lr"]
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) in keys
    }


def gather_rates(optimizer: Any) -> dict[str, float]:
    """``table_rates`` of every rank, on rank 0 (``{}`` elsewhere; a collective)."""
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(table_rates(optimizer), parts, dst=0)
    return {k: v for part in parts or [] for k, v in part.items()}


def set_rates(optimizer: Any, rates: Mapping[str, float]) -> None:
    """Each param group of a fused optimiser at its tables' saved rate (``table_rates``)."""
    keys = {id(p): k for k, p in optimizer.params.items()}
    for group in optimizer.param_groups:
        saved = [rates[keys[id(p)]] for p in group["params"] if keys.get(id(p)) in rates]
        if saved:
            group["lr"] = saved[0]


def load_local(tensors: Mapping[str, Any], whole: Mapping[str, torch.Tensor]) -> None:
    """Copies each rank's slices of the ``whole`` tensors into its shards, in place."""
    with torch.no_grad():
        for key, value in tensors.items():
            for s in value.local_shards():
                s.tensor.copy_(whole[key][_slices(s.metadata.shard_offsets, s.tensor.shape)])


def _slices(offsets: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """A fused optimiser's state tensors (ShardedTensors) by ``<table>.<state>``."""
    return {
        k: v for per_table in optimizer.state_dict()["state"].values() for k, v in per_table.items()
    }


@dataclass(frozen=True)
class PlannedTable:
    name: str
    rows: int
    dim: int
    sharding: str
    ranks: tuple[int, ...]


def megabytes(rows: int, dim: int) -> float:
    """An fp32 table's size."""
    return rows * dim * 4 / 2**20


def plan_lines(tables: Sequence[PlannedTable], world: int, budget_gb: float) -> str:
    lines = [f"sharding plan (TorchRec, {world} ranks, within {budget_gb:.3g} GB per rank):"]
    for t in tables:
        size = f"{t.rows:,} x {t.dim} ({megabytes(t.rows, t.dim):.2f} MB)"
        lines.append(f"  {t.name}: {size}, {t.sharding} on rank {','.join(map(str, t.ranks))}")
    return "\n".join(lines)


def shard(
    tables: ShardedTables,
    rates: Mapping[str, float],
    optimizer: str,
    sharding_type: str,
    budget_gb: float,
    device: torch.device,
) -> list[PlannedTable]:
    """Shards ``tables`` in place across the process group (a collective): the optimiser
    (``FUSED[optimizer]``) fused into each table's backward at its feature's rate, the plan
    within ``budget_gb`` per rank (``budget``), the tables' current rows loaded."""
    import torchrec.optim as fused_optimizers
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.shard import shard_modules
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if optimizer not in FUSED or (optimizer == "sparse_adam" and device.type == "cpu"):
        raise ValueError(
            f"--model.sharding torchrec fuses the tables' optimiser into the backward; FBGEMM's "
            f"{device.type.upper()} kernels have no {optimizer!r}: use --model.embedding_optimizer "
            "rowwise_adagrad (or adagrad; sparse_adam on GPUs)"
        )
    world = dist.get_world_size()
    seed = [tables.init_seed]  # rank 0's: each rank draws its shards of one initial table
    dist.broadcast_object_list(seed, src=0)
    tables.init_seed = seed[0]
    kind = getattr(fused_optimizers, FUSED[optimizer])
    for name, dim in zip(tables.names, tables.dims, strict=True):
        weight = tables.collections[f"d{dim}"].embeddings[table_name(name)].weight
        apply_optimizer_in_backward(kind, [weight], {"lr": rates[name], "eps": 1e-8})
    constraints = (
        {}
        if sharding_type == "auto"
        else {
            table_name(n): ParameterConstraints(sharding_types=[sharding_type])
            for n in tables.names
        }
    )
    sharders = [EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=topology(world, device, budget_gb), constraints=constraints
    )
    try:
        plan = planner.collective_plan(tables, sharders, dist.group.WORLD)
    except PlannerError as error:
        sizes = ", ".join(
            f"{table_name(n)} {rows:,} x {dim} ({megabytes(rows, dim):.1f} MB)"
            for n, rows, dim in zip(tables.names, tables.cardinalities, tables.dims, strict=True)
        )
        raise ValueError(
            f"no sharding plan fits the tables ({sizes}, plus their optimiser state) in "
            f"{world} ranks of {budget_gb:.3g} GB (--model.sharding_budget_gb): {str(error)[:600]}"
        ) from error
    shard_modules(
        tables,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    if tables.initial is None:
        initialise_shards(tables)
    else:
        tables.load_state_dict(tables.initial, strict=False)
    tables.initial = None
    placed = {name: p for module in plan.plan.values() for name, p in module.items()}
    tables.device = device
    tables.plan = {t: (p.sharding_type, tuple(p.ranks or ())) for t, p in placed.items()}
    return [
        PlannedTable(table_name(n), rows, dim, *tables.plan[table_name(n)])
        for n, rows, dim in zip(tables.names, tables.cardinalities, tables.dims, strict=True)
    ]


def budget(device: torch.device, budget_gb: float | None) -> float:
    """GB per rank the plan must fit: ``budget_gb``, else the device's memory (a GPU's; the
    machine's RAM shared by the ranks on it)."""
    if budget_gb:
        return budget_gb
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return ram / local / 2**30


def topology(world: int, device: torch.device, budget_gb: float) -> Any:
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    cap = int(budget_gb * 2**30)
    memory = {"hbm_cap_bytes": cap} if device.type == "cuda" else {"ddr_cap_bytes": cap}
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    config = TrainerConfig(world_size=world, local_world_size=local, **memory)
    return TopologyFactory.create_topology(
        trainer_config=config, kernel_config=KernelConfig(compute_device=device.type)
    )
