"""What export does to the graph for the service: the saved optimisation (used only when it
was made from the very graph served) and INT8 quantisation (refused past an AUC tolerance)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper

from features.contract import META, OPTIMIZED_GRAPH, graph_digest, optimized_path
from features.onnx_graph import raw_feeds
from pipelines.checkpoints import RunError, load, locate
from pipelines.export import Exported, export
from pipelines.export.optimize import GraphChoice, auc_change, quantize_int8
from pipelines.export.parity import parity_rows
from serving.model import Scorer
from tests.conftest import Runs


def scorer(path: Path) -> Scorer:
    return Scorer(path, "m", "local", str(path), 1, optimized_path=optimized_path(path))


def test_the_optimised_graph_is_saved_stamped_and_used_only_for_its_source(
    runs: Runs, exported: Exported, int8: Exported, tmp_path: Path
) -> None:
    saved = optimized_path(exported.path)
    meta = {p.key: p.value for p in onnx.load(str(saved)).metadata_props}
    assert meta[META.OPTIMIZED_FROM] == graph_digest(exported.path)
    assert meta[META.TASKS]  # the contract's metadata survives the optimisation
    assert scorer(exported.path).graph == saved
    client = MlflowClient(runs.uri)
    logged = {a.path for a in client.list_artifacts(runs.home, "serving")}
    assert f"serving/{OPTIMIZED_GRAPH}" in logged

    # A graph beside an optimised file made from another graph: optimised at start-up instead.
    copy = tmp_path / "m.onnx"
    shutil.copyfile(exported.path, copy)
    shutil.copyfile(optimized_path(int8.path), optimized_path(copy))
    assert scorer(copy).graph == copy


@pytest.fixture(scope="module")
def int8(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("int8") / "model.onnx"
    return export(
        run=runs.home,
        out=out,
        quantize="int8",
        quantize_tolerance=0.05,
        register=False,
        tracking_uri=runs.uri,
        quiet=True,
    )


def test_int8_export_reports_each_tasks_auc_change_and_scores_close(
    runs: Runs, exported: Exported, int8: Exported, tmp_path: Path
) -> None:
    model = onnx.load(str(int8.path))
    assert {p.key: p.value for p in model.metadata_props}[META.QUANTIZED] == "int8"
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    assert set(int8.int8.change) == set(int8.int8.float_auc) and len(int8.int8.change) == 8
    assert all(abs(d) <= 0.05 for d in int8.int8.change.values())
    assert min(int8.int8.rows.values()) > 100
    client = MlflowClient(runs.uri)
    _, data = load(locate(runs.home, client, tmp_path), client, tmp_path)
    frame = parity_rows(data, 500)
    got = [scorer(e.path).score(raw_feeds(frame, scorer(e.path).columns)) for e in (int8, exported)]
    assert scorer(int8.path).graph == optimized_path(int8.path)
    assert 0 < np.abs(got[0] - got[1]).max() < 0.05  # quantised, yet close


def test_int8_is_refused_past_the_tolerance(runs: Runs, int8: Exported, tmp_path: Path) -> None:
    task, worst = int8.int8.worst()
    assert worst != 0  # thousands of held-out rows: int8 moves every AUC a little
    with pytest.raises(RunError, match=f"INT8 refused: the AUC of {task} moved by"):
        export(
            run=runs.home,
            out=tmp_path / "m.onnx",
            quantize="int8",
            quantize_tolerance=abs(worst) / 2,
            register=False,
            tracking_uri=runs.uri,
            quiet=True,
        )
    assert not (tmp_path / "m.onnx").exists()


def test_auc_change_skips_tasks_without_both_classes() -> None:
    probs = np.array([[0.1, 0.2], [0.9, 0.3], [0.4, 0.8]])
    labels = np.array([[0.0, 1.0], [1.0, np.nan], [0.0, 1.0]])
    change = auc_change(probs, probs[:, ::-1].copy(), labels, ["a", "b"])
    assert change.float_auc == {"a": 1.0} and change.rows == {"a": 3}
    assert change.int8_auc == {"a": 0.5}  # b's scores (0.2, 0.3, 0.8) against a's labels
    assert change.worst() == ("a", -0.5)


def _quantized(path: Path) -> str | None:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}.get(META.QUANTIZED)


def test_auto_writes_the_graph_it_timed_faster_and_refuses_past_the_tolerance(
    runs: Runs, int8: Exported, tmp_path: Path
) -> None:
    common = dict(run=runs.home, register=False, tracking_uri=runs.uri, quiet=True)
    auto = export(
        out=tmp_path / "a" / "model.onnx", quantize="auto", quantize_tolerance=0.05, **common
    )
    choice = auto.choice
    assert choice is not None and choice.refused is None and choice.rows == 500
    assert choice.float_ms > 0 and choice.int8_ms is not None and choice.int8_ms > 0
    # what was timed faster is what was written
    assert (_quantized(auto.path) == "int8") == choice.int8 == (auto.int8 is not None)

    _, worst = int8.int8.worst()
    refused = export(
        out=tmp_path / "r" / "model.onnx", quantize="auto", quantize_tolerance=abs(worst) / 2,
        **common,
    )  # fmt: skip
    assert refused.choice is not None and refused.choice.int8_ms is None
    assert refused.choice.refused.startswith("INT8 refused: the AUC of")
    assert _quantized(refused.path) is None and refused.int8 is None


@pytest.mark.parametrize(
    ("float_ms", "int8_ms", "kept"),
    [(3.0, 2.0, True), (2.0, 3.0, False), (2.0, 1.95, False), (2.0, None, False)],
)
def test_the_faster_graph_is_kept(float_ms: float, int8_ms: float | None, kept: bool) -> None:
    refused = None if int8_ms is not None else "INT8 refused: ..."
    choice = GraphChoice(500, float_ms, int8_ms, refused)
    assert choice.int8 == kept
    assert str(choice).startswith("INT8 kept" if kept else "float32 kept")


def test_quantising_quiets_the_root_logger_for_its_own_call_only() -> None:
    """The quantiser's advice is silenced while it runs; afterwards the process's warnings (a
    service's, in the same process) keep their level."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [weight],
    )
    root = logging.getLogger()
    before = root.level
    quantized = quantize_int8(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert root.level == before
    assert any(n.op_type != "MatMul" for n in quantized.graph.node)  # it did quantise
