"""The one torch scoring path (ranker.scoring): named outputs of a stream, in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.datamodule import TensorBatch
from ranker.calibration import Calibrator
from ranker.models import MMoE
from ranker.scoring import Scored, graph_outputs, score
from tests.ranker.common import INPUTS, SMALL, TASKS, batch


@pytest.mark.parametrize("planned", [0, 5, 37, 1000])
def test_scored_holds_every_batch_in_order_whatever_was_planned(planned: int) -> None:
    rng = np.random.default_rng(planned)
    batches = [
        (rng.random((n, 3), np.float32), rng.random((n, 3)), rng.integers(0, 9, n))
        for n in (8, 8, 7, 0, 14)
    ]
    scored = Scored(planned, history="seen")
    for probs, labels, users in batches:
        batch = TensorBatch(
            torch.zeros(len(users), 1, dtype=torch.long),
            torch.zeros(len(users), 0),
            torch.from_numpy(labels.astype(np.float32)),
            torch.from_numpy(users),
            lengths={"seen": torch.from_numpy(users * 2)},
        )
        scored.add(
            {"probabilities": torch.from_numpy(probs), "extra": torch.ones(len(users))}, batch
        )
    probs, labels, users = scored.outputs["probabilities"], scored.labels, scored.users
    assert scored.size == 37 and scored.outputs["extra"].shape == (37,)
    np.testing.assert_array_equal(probs, np.concatenate([b[0] for b in batches]))
    expected = np.concatenate([b[1] for b in batches]).astype(np.float32)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(users, np.concatenate([b[2] for b in batches]))
    np.testing.assert_array_equal(scored.lengths, users * 2)
    assert (probs.dtype, labels.dtype, users.dtype) == (np.float32, np.float32, np.int64)


def test_graph_outputs_calibrate_and_squash_every_logits_output_only() -> None:
    calibrator = Calibrator(2)
    calibrator.set(np.array([2.0, 0.5]), np.array([0.0, 1.0]))
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    arms = torch.stack([logits, -logits], dim=1)  # [B, A, T]
    norm = torch.tensor([3.0, 4.0])
    out = graph_outputs({"logits": logits, "arm_logits": arms, "norm": norm}, calibrator)
    assert list(out) == ["probabilities", "arm_probabilities", "norm", "uplift"]
    torch.testing.assert_close(
        out["probabilities"], torch.sigmoid(logits * calibrator.scale + calibrator.bias)
    )
    torch.testing.assert_close(
        out["arm_probabilities"][:, 1], torch.sigmoid(-logits * calibrator.scale + calibrator.bias)
    )
    torch.testing.assert_close(out["norm"], norm)
    uplift = out["arm_probabilities"][:, 1:] - out["arm_probabilities"][:, :1]
    torch.testing.assert_close(out["uplift"], uplift)  # each arm's against control (arm 0)


def test_score_is_the_eval_forward_of_every_batch_in_order() -> None:
    torch.manual_seed(0)
    model = MMoE(INPUTS, TASKS, num_experts=3, **SMALL)
    model.train()
    batches = []
    for i, n in enumerate((16, 5, 30)):
        cat, num = batch(n, seed=i)
        labels = torch.rand(n, len(TASKS))
        batches.append(TensorBatch(cat, num, labels, torch.arange(n) + 100 * i))
    scored = score(model, batches, rows=4)  # planned for fewer: grows
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(b.cat, b.num)["logits"] for b in batches]).numpy()
    np.testing.assert_allclose(scored.outputs["logits"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(scored.users, torch.cat([b.users for b in batches]).numpy())
    np.testing.assert_array_equal(scored.lengths, -1)  # no history asked for
    limited = score(model, batches, max_batches=2)
    assert limited.size == 21


@pytest.mark.parametrize("rows", [0, 3])
def test_an_empty_stream_has_no_rows(rows: int) -> None:
    model = MMoE(INPUTS, TASKS, num_experts=3, **SMALL)
    scored = score(model, [], rows=rows)
    assert scored.size == 0 and scored.output("probabilities", 4).shape == (0, 4)
    assert scored.labels.shape[0] == 0 and scored.users.shape == (0,)
