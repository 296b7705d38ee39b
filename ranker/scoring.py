"""Scoring with torch, written once: a model's named outputs over a stream of batches.

Everything that scores with torch goes through here: calibration (raw logits of the validation
split), ``ranker evaluate`` (with the expert statistics of the same pass), export's parity
reference and its top-k near-ties, ``ranker predict --backend torch``, and the module's own
validation and test (Lightning runs that loop; each batch goes through ``batch_outputs`` and
``Scored.add`` as ``score`` does).

A model returns named outputs (``ranker.models.base``); with a calibrator they become what the
exported graph returns (``graph_outputs``): every logits output calibrated per task and squashed
to probabilities, under the graph's names (``features.contract.graph_output``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from features.contract import (
    ARM_LOGITS,
    ARM_OUTPUT,
    LOGITS,
    OUTPUT,
    UPLIFT,
    graph_output,
    is_logits,
)
from features.datamodule import TensorBatch
from ranker.calibration import Calibrator
from ranker.experts import Internals
from ranker.models.base import MultiTaskModel, Outputs


def graph_outputs(outputs: Outputs, calibrator: Calibrator) -> Outputs:
    """The exported graph's outputs of a model's: each logits output (``logits [B, T]``,
    ``arm_logits [B, A, T]``: tasks on the last axis) through the per-task ``calibrator`` and a
    sigmoid, renamed (``logits`` -> ``probabilities``); any other output as it is; an uplift
    model's ``uplift [B, A-1, T]`` added: each arm's probability minus control's."""
    graph = {
        graph_output(name): torch.sigmoid(calibrator(value)) if is_logits(name) else value
        for name, value in outputs.items()
    }
    if ARM_LOGITS in outputs:  # an uplift model: each arm's uplift against control
        arms = graph[ARM_OUTPUT]
        graph[UPLIFT] = arms[:, 1:] - arms[:, :1]
    return graph


def probabilities(logits: np.ndarray, calibrator: Calibrator | None = None) -> np.ndarray:
    """``graph_outputs`` of raw logits ``[N, T]``, numpy in and out: the graph's probabilities
    (through ``calibrator`` when given, else the plain sigmoid), as evaluation and the
    calibration report compare them before and after calibration."""
    return arrays_of_graph({LOGITS: logits}, calibrator)[OUTPUT]


def arrays_of_graph(
    outputs: Mapping[str, np.ndarray], calibrator: Calibrator | None = None
) -> dict[str, np.ndarray]:
    """``graph_outputs`` of a model's raw outputs (e.g. ``Scored.outputs``), numpy in and out
    (the plain sigmoid without a ``calibrator``)."""
    z = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in outputs.items()}
    calibrator = calibrator or Calibrator(z[LOGITS].shape[-1])
    with torch.no_grad():
        return {k: v.numpy() for k, v in graph_outputs(z, calibrator).items()}


def batch_outputs(
    network: MultiTaskModel,
    batch: TensorBatch,
    calibrator: Calibrator | None = None,
    internals: Callable[[Internals], None] | None = None,
) -> Outputs:
    """The network's outputs for one batch (moved to the network's device), as the graph
    names them when a ``calibrator`` is given; ``internals`` receives the batch's experts and
    gates (``MultiTaskModel.forward_with_internals``) when given."""
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batch = batch.to(device)
    cat, num, sequences = batch.inputs
    if internals is None:
        outputs = network(cat, num, sequences, batch.treatment)
    else:
        outputs, recorded = network.forward_with_internals(cat, num, sequences, batch.treatment)
        internals(recorded)
    return outputs if calibrator is None else graph_outputs(outputs, calibrator)


class Scored:
    """A stream's named outputs (``[N, ...]`` each, float32), with its rows' ``labels [N, T]``,
    ``users [N]`` and the length of one history per row (``lengths [N]``, -1 where none), in
    arrays allocated once for ``rows`` (doubled when more come).

    One allocation per array, not one per batch: small arrays kept batch after batch fragment
    the heap between the loader's large short-lived buffers, and memory then grows with the
    split several times faster than the scores do (validating 790k rows: +0.28 GB for 57 MB
    of scores). Rows never written are never touched, so planning for more costs nothing.
    """

    def __init__(self, rows: int = 0, history: str | None = None) -> None:
        self.planned, self.history, self.size = max(rows, 1), history, 0
        self._arrays: dict[str, np.ndarray] = {}  # "out:<name>", "labels", "users", "lengths"

    def add(self, outputs: Mapping[str, torch.Tensor], batch: TensorBatch) -> None:
        """One batch's outputs and its rows."""
        lengths = batch.lengths.get(self.history) if self.history else None
        parts = {f"out:{k}": v.detach().float().cpu().numpy() for k, v in outputs.items()}
        parts["labels"] = batch.labels.cpu().numpy()
        parts["users"] = batch.users.cpu().numpy()
        parts["lengths"] = (
            lengths.cpu().numpy() if lengths is not None else np.full(len(batch), -1, np.int64)
        )
        if batch.treatment is not None:  # uplift data
            parts["treatment"] = batch.treatment.cpu().numpy()
            parts["propensity"] = batch.propensity.cpu().numpy()
        start, end = self.size, self.size + len(batch)
        for key, part in parts.items():
            self._put(key, part, start, end)
        self.size = end

    def _put(self, key: str, part: np.ndarray, start: int, end: int) -> None:
        array = self._arrays.get(key)
        if array is None:
            array = np.empty((max(self.planned, end), *part.shape[1:]), part.dtype)
        elif end > len(array):
            grown = np.empty((max(end, 2 * len(array)), *array.shape[1:]), array.dtype)
            grown[:start] = array[:start]
            array = grown
        array[start:end] = part
        self._arrays[key] = array

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        """Every named output of the rows added so far."""
        return {k[4:]: v[: self.size] for k, v in self._arrays.items() if k.startswith("out:")}

    def _rows(self, key: str, empty: tuple[int, ...], dtype: type) -> np.ndarray:
        array = self._arrays.get(key)
        return array[: self.size] if array is not None else np.empty(empty, dtype)

    @property
    def labels(self) -> np.ndarray:
        return self._rows("labels", (0, 0), np.float32)

    @property
    def users(self) -> np.ndarray:
        return self._rows("users", (0,), np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return self._rows("lengths", (0,), np.int64)

    @property
    def treatment(self) -> np.ndarray:
        """Uplift data: each row's arm (0 = control)."""
        return self._rows("treatment", (0,), np.int64)

    @property
    def propensity(self) -> np.ndarray | None:
        """Uplift data: each row's propensity; None where every row's is 1 (randomised)."""
        p = self._rows("propensity", (0,), np.float32)
        return None if np.all(p == 1.0) else p

    def output(self, name: str, tasks: int) -> np.ndarray:
        """One output; ``[0, tasks]`` when no row was added (a rank that read no row)."""
        return self.outputs.get(name, np.empty((0, tasks), np.float32))


def score(
    network: MultiTaskModel,
    batches: Iterable[TensorBatch],
    *,
    rows: int = 0,
    calibrator: Calibrator | None = None,
    internals: Callable[[Internals], None] | None = None,
    history: str | None = None,
    max_batches: int | None = None,
) -> Scored:
    """Score ``batches`` (at most ``max_batches``) with ``network`` in eval mode (BatchNorm on
    running statistics, no dropout), without gradients: the named outputs (the graph's, when
    a ``calibrator`` is given) and the rows' labels, users and ``history`` lengths. ``rows``:
    how many to plan for. Every module's training mode is restored afterwards."""
    scored = Scored(rows, history)
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                scored.add(batch_outputs(network, batch, calibrator, internals), batch)
    finally:
        for module, mode in modes:
            module.training = mode
    return scored
