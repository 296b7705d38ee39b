"""A model with more outputs than a ranker's, declared in this file alone (with its config,
``two_heads.yaml``, and its test, ``test_named_outputs.py``): MMoE plus a second logit per task
(a linear head on the embedded input) and one number per row that is not a logit (the input's
norm). Training, scoring, export, ``predict`` and the service carry the extra names through.

    y_t = sigmoid(tower_t(...)),    y'_t = sigmoid(w_t . x + c_t),    n = ||x||_2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from features.config import TaskSpec
from features.state import InputSpec
from ranker.experts import Internals
from ranker.layers import RequestSplit, as_dense
from ranker.models import MMoE
from ranker.models.base import Outputs


class TwoHeads(MMoE):
    def __init__(self, inputs: InputSpec, tasks: Sequence[TaskSpec], **kwargs: Any) -> None:
        super().__init__(inputs, tasks, **kwargs)
        self.second = nn.Linear(self.input_dim, len(self.tasks))

    def head(self, x: torch.Tensor | RequestSplit, internals: Internals | None) -> Outputs:
        dense = as_dense(x)
        outputs = super().head(x, internals)
        return {**outputs, "second_logits": self.second(dense), "norm": dense.norm(dim=1)}
