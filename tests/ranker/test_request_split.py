"""The exported scorer's split input (``ranker.layers.RequestSplit``): the request's columns
held once per request give every zoo model the logits of the dense input, and the request's
share of the first layer is computed once, not once per candidate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from features.contract import RequestLayout
from ranker.models import MultiTaskModel
from tests.conftest import CONFIGS
from tests.ranker.common import ITEM, SEQ_INPUTS, batch, sequences
from tests.ranker.test_sequence import MODEL_CONFIGS, model_of

# user, hour (context) and age are the request's; item, duration and the attention over the
# history (its query is the candidate's item) vary per candidate.
SIDES = {"user": "user", "item": "item", "hour": "context", "age": "user", "duration": "item"}
LAYOUT = RequestLayout.of(SEQ_INPUTS.cat_names, SEQ_INPUTS.num_names, SIDES)


def request_batch(candidates: int, requests: int, seed: int = 0):
    """``requests`` requests' rows (R = 1 or N) and their candidates, dense and split."""
    cat, num = batch(candidates, seed)
    seqs = sequences(requests, seed)
    index = torch.arange(candidates) % requests
    request_cat = batch(requests, seed + 1)[0][:, LAYOUT.cat_request_columns]
    request_num = batch(requests, seed + 1)[1][:, LAYOUT.num_request_columns]
    dense_cat, dense_num = cat.clone(), num.clone()
    dense_cat[:, LAYOUT.cat_request_columns] = request_cat[index]
    dense_num[:, LAYOUT.num_request_columns] = request_num[index]
    dense = (dense_cat, dense_num, {k: v[index] for k, v in seqs.items()})
    split = (
        cat[:, LAYOUT.cat_candidate_columns],
        num[:, LAYOUT.num_candidate_columns],
        request_cat,
        request_num,
        index,
        seqs,
        LAYOUT,
    )
    return dense, split


def split_logits(model: MultiTaskModel, split: tuple) -> torch.Tensor:
    return model.head(model.embed_split(*split), None)


@pytest.mark.parametrize(
    "path", MODEL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS / "model").with_suffix("").as_posix()
)
@pytest.mark.parametrize("requests", [1, 48])
def test_the_split_input_gives_the_dense_logits(path: Path, requests: int) -> None:
    torch.manual_seed(0)
    model = model_of(path).eval()
    if not model.splits_request:
        pytest.skip(f"{type(model).__name__} reads its inputs whole (joined back at export)")
    with torch.no_grad():  # BatchNorm statistics away from their initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        dense, split = request_batch(48, requests)
        expected = model(*dense)
        got = split_logits(model, split)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_request_share_of_the_first_layer_is_computed_once() -> None:
    """MMoE over 512 candidates of one request: the split input saves the request columns'
    share of the experts' first layer and of the gates, for all but one candidate (the two
    short histories only: searching a long one per candidate is work the split cannot save)."""
    short = replace(SEQ_INPUTS, sequences=SEQ_INPUTS.sequences[:2])
    model = model_of(CONFIGS / "model" / "mmoe.yaml", short).eval()
    n = 512
    dense, split = request_batch(n, 1)
    dense = (*dense[:2], {k: v for k, v in dense[2].items() if k in ("clicked", "viewed")})

    def flops(call) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        return counter.get_total_flops()

    layer = model.layers[0]
    first = sum(
        pool.weights[0].shape[0] * pool.weights[0].shape[2] for pool in layer.pools.values()
    )
    gates = sum(g.out_features for g in layer.gates.values())
    dims = SEQ_INPUTS.embedding_dims
    request_width = sum(dims[c] for c in LAYOUT.cat_request_columns)  # user, hour
    request_width += len(LAYOUT.num_request_columns) + dims[ITEM]  # age, the mean-pooled history
    saved = 2 * (n - 1) * request_width * (first + gates)
    dense_flops, split_flops = (
        flops(lambda: model(*dense)),
        flops(lambda: split_logits(model, split)),
    )
    assert dense_flops - split_flops >= 0.99 * saved, (dense_flops, split_flops, saved)
    assert split_flops < 0.8 * dense_flops
