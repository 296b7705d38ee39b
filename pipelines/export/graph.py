"""The exported graph: the FeatureState's transform (``features.onnx_graph``: raw values in,
vocabulary lookup and numeric transforms inside) followed by the network, its calibration and
the sigmoid (``torch.onnx.export``, dynamo), merged into one ONNX model: raw columns in, one
output per named model output (``features.contract.graph_output``: ``probabilities [N, T]``
for every ranker) out, the contract's metadata on it."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings

import onnx
import torch
from onnx import compose

from features.config import DatasetConfig
from features.contract import (
    META,
    NULL_INT,
    NULL_STRING,
    REQUEST_CAT,
    REQUEST_INDEX,
    REQUEST_NUM,
    RequestLayout,
)
from features.onnx_graph import preprocessing_model, raw_inputs, request_layout, sequence_output
from features.state import FeatureState
from ranker.experts import ExpertPool
from ranker.layers import RequestSplit
from ranker.models.base import Outputs
from ranker.module import RankerModule
from ranker.scoring import graph_outputs

NETWORK_INPUTS = ("cat", "num", REQUEST_CAT, REQUEST_NUM, REQUEST_INDEX)  # then the sequences


class GraphNetwork(torch.nn.Module):
    """The network as the graph runs it: the feature graph's outputs split per candidate and
    per request (``features.contract.RequestLayout``) in, the graph's outputs out (``outputs``
    by name; ``forward`` as a tuple in that order). A network that takes a ``RequestSplit``
    computes the request's share of its first layer once per request; any other, and every
    uplift model (scored for every arm), gets its inputs joined back to one row per
    candidate."""

    def __init__(self, module: RankerModule, layout: RequestLayout) -> None:
        super().__init__()
        self.network, self.calibrator, self.layout = module.network, module.calibrator, layout
        self.names = [s.name for s in module.network.inputs.sequences]

    def outputs(self, *inputs: torch.Tensor) -> Outputs:
        """``inputs``: ``forward``'s, in its order."""
        cat, num, request_cat, request_num, index, *sequences = inputs
        ids = dict(zip(self.names, sequences, strict=True))
        network, layout = self.network, self.layout
        if network.splits_request and not network.inputs.arms:
            x = network.embed_split(cat, num, request_cat, request_num, index, ids, layout)
            raw = network.head(x, None)
        else:
            cat = RequestSplit(
                cat, request_cat, index, layout.cat_candidate_columns, layout.cat_request_columns
            ).dense()
            num = RequestSplit(
                num, request_num, index, layout.num_candidate_columns, layout.num_request_columns
            ).dense()
            raw = network(cat, num, {k: v.index_select(0, index) for k, v in ids.items()})
        return graph_outputs(raw, self.calibrator)

    def forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        request_cat: torch.Tensor,
        request_num: torch.Tensor,
        index: torch.Tensor,
        *sequences: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        outputs = self.outputs(cat, num, request_cat, request_num, index, *sequences)
        return tuple(outputs.values())


def example_inputs(module: RankerModule, layout: RequestLayout) -> tuple[torch.Tensor, ...]:
    """Valid inputs of ``GraphNetwork``: 4 candidates of 2 requests (the dynamo exporter
    specialises a size of 1; any size >= 2 stays symbolic)."""
    spec, rows, requests = module.inputs, 4, 2

    def ids(columns: list[int], n: int) -> torch.Tensor:  # [n, len(columns)] valid ids
        cardinality = torch.tensor([spec.cardinalities[c] for c in columns], dtype=torch.long)
        return torch.arange(n).unsqueeze(1) % cardinality

    sequences = [
        ids([spec.cat_names.index(s.vocabulary)] * s.max_len, requests) for s in spec.sequences
    ]
    return (
        ids(layout.cat_candidate_columns, rows),
        torch.zeros(rows, len(layout.num_candidate_columns)),
        ids(layout.cat_request_columns, requests),
        torch.zeros(requests, len(layout.num_request_columns)),
        torch.arange(rows) % requests,
        *sequences,
    )


def network_model(module: RankerModule, layout: RequestLayout) -> onnx.ModelProto:
    """The feature graph's outputs -> the graph's outputs, exported with dynamic candidate and
    request row counts; the output names are the model's, renamed by the contract."""
    inference = copy.deepcopy(module).eval()
    for pool in (m for m in inference.modules() if isinstance(m, ExpertPool)):
        pool.fold_norms()  # BatchNorm into the weights: one matmul per expert layer
    wrapped = GraphNetwork(inference, layout)
    example = example_inputs(module, layout)
    with torch.no_grad():
        names = list(wrapped.outputs(*example))
    n, r = torch.export.Dim("candidates"), torch.export.Dim("request_rows")
    shapes: tuple = ({0: n}, {0: n}, {0: r}, {0: r}, {0: n})
    sequences = [sequence_output(s.name) for s in module.inputs.sequences]
    shapes += (tuple({0: r} for _ in sequences),) if sequences else ()
    # The exporter narrates each step on stdout and warns about optional packages; keep the
    # command's output to what the user asked for (errors still raise).
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped,
            example,
            dynamo=True,
            input_names=[*NETWORK_INPUTS, *sequences],
            output_names=names,
            dynamic_shapes=shapes,
            opset_version=18,
            verbose=False,
        )
    return program.model_proto


def scorer_graph(
    module: RankerModule, state: FeatureState, config: DatasetConfig
) -> onnx.ModelProto:
    """The whole scorer: raw columns -> the graph's outputs, the contract in its metadata
    (from the model's FeatureState and dataset config; no log read)."""
    features = preprocessing_model(state, config.features)
    network = network_model(module, request_layout(state, config.features))
    features.ir_version = network.ir_version
    sequences = [sequence_output(s.name) for s in state.sequences]
    io_map = [(n, n) for n in (*NETWORK_INPUTS, *sequences)]
    model = compose.merge_models(features, network, io_map=io_map)
    opsets = {o.domain: o.version for o in model.opset_import}  # the merge lists "" twice
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    inputs = raw_inputs(state, config.features)
    onnx.helper.set_model_props(
        model,
        {
            META.TASKS: json.dumps([t.name for t in module.tasks]),
            META.INPUTS: json.dumps([i.to_dict() for i in inputs]),
            META.USER_KEY: config.user_key,
            META.ITEM_KEY: config.item_key,
            META.NULL_INT: str(NULL_INT),
            META.NULL_STRING: NULL_STRING,
            META.MODEL: type(module.network).__name__,
            META.DATASET: config.name,
            **({META.ARMS: json.dumps(state.treatment.arms)} if state.treatment else {}),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model
