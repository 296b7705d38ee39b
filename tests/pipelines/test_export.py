"""ONNX export: the graph computes the training transform and the model, on real rows."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from features.contract import NULL_INT, OUTPUT, REQUEST_CAT, REQUEST_INDEX, REQUEST_NUM
from features.datamodule import RankerDataModule
from features.onnx_graph import (
    preprocessing_model,
    raw_feeds,
    raw_inputs,
    request_layout,
    sequence_output,
)
from pipelines.checkpoints import RunError
from pipelines.commands import main
from pipelines.export import export
from pipelines.export.graph import scorer_graph
from pipelines.export.parity import check_parity, parity_rows, torch_outputs
from pipelines.export.registry import promote
from ranker.models import build as build_network
from ranker.module import RankerModule
from tests.conftest import KUAIRAND_CONFIG, SYNTHETIC_CONFIG, Runs


def session_of(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def feature_outputs(
    data: RankerDataModule, feeds: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], int]:
    """The feature graph's outputs joined back to one row per candidate: ``cat``, ``num``, the
    sequences, and the request row count R the graph kept."""
    layout = request_layout(data.state, data.config.features)
    names = [sequence_output(s.name) for s in data.state.sequences]
    graph = preprocessing_model(data.state, data.config.features)
    out = dict(zip(["cat", "num", REQUEST_CAT, REQUEST_NUM, REQUEST_INDEX, *names],
                   session_of(graph).run(
                       ["cat", "num", REQUEST_CAT, REQUEST_NUM, REQUEST_INDEX, *names], feeds
                   ), strict=True))  # fmt: skip
    index = out[REQUEST_INDEX]
    rows = len(index)
    cat = np.zeros((rows, len(layout.cat_request)), dtype=np.int64)
    cat[:, layout.cat_candidate_columns] = out["cat"]
    cat[:, layout.cat_request_columns] = out[REQUEST_CAT][index]
    num = np.zeros((rows, len(layout.num_request)), dtype=np.float32)
    num[:, layout.num_candidate_columns] = out["num"]
    num[:, layout.num_request_columns] = out[REQUEST_NUM][index]
    return cat, num, [out[n][index] for n in names], len(out[REQUEST_CAT])


@pytest.fixture(scope="module")
def kuairand() -> RankerDataModule:
    return RankerDataModule(str(KUAIRAND_CONFIG))


@pytest.fixture(scope="module")
def synthetic(tiny_log: Path) -> RankerDataModule:
    return RankerDataModule(str(SYNTHETIC_CONFIG), log_path=str(tiny_log))


@pytest.fixture(scope="module")
def hashed(tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> RankerDataModule:
    """The synthetic dataset with item and author ids hashed (the history shares the items')."""
    config = tmp_path_factory.mktemp("hashed") / "hashed.yaml"
    text = SYNTHETIC_CONFIG.read_text().replace("path: ../../data/synthetic", f"path: {tiny_log}")
    for name, buckets in (("item_id", 997), ("author_id", 50)):
        line = f"  - {{name: {name}, kind: categorical, side: item, embedding_dim: 16}}"
        assert line in text
        text = text.replace(line, line[:-1] + f", hash_buckets: {buckets}}}")
    config.write_text(text)
    return RankerDataModule(str(config), log_path=str(tiny_log))


@pytest.fixture(scope="module")
def searched(tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> RankerDataModule:
    """The synthetic dataset with long histories searched: softly (by embedding), and hard by
    the candidate's author (an aligned history of authors)."""
    config = tmp_path_factory.mktemp("searched") / "searched.yaml"
    text = SYNTHETIC_CONFIG.read_text().replace("path: ../../data/synthetic", f"path: {tiny_log}")
    history = "from_label: click, timestamp: ts, max_len: 60"
    extra = f"""
  - {{name: long_clicks, kind: sequence, side: user, vocabulary_of: item_id, {history},
     pooling: search, search_k: 8}}
  - {{name: long_authors, kind: sequence, side: user, vocabulary_of: author_id, {history},
     pooling: none}}
  - {{name: by_author, kind: sequence, side: user, vocabulary_of: item_id, {history},
     pooling: search, search_k: 8, search_by: long_authors}}
tasks:"""
    config.write_text(text.replace("\ntasks:", extra, 1))
    return RankerDataModule(str(config), log_path=str(tiny_log))


def with_bad_values(frame: pl.DataFrame, data: RankerDataModule) -> pl.DataFrame:
    """Unknown ids, missing values and non-finite numbers in the first rows."""
    state = data.state
    n = frame.height
    rows = np.arange(n)
    out = frame
    for s in state.categorical:
        column = frame[s.column]
        if s.dtype == "int":
            unknown = pl.Series([(-1) ** i * 10**12 + i for i in range(n)], dtype=pl.Int64)
        else:
            unknown = pl.Series([f"never seen {i}" for i in range(n)])
        out = out.with_columns(
            pl.when(pl.lit(rows % 7 == 1))
            .then(None)
            .when(pl.lit(rows % 7 == 2))
            .then(unknown.cast(column.dtype, strict=False))
            .otherwise(pl.col(s.column))
            .alias(s.column)
        )
    vocabulary = {c.name: c for c in state.categorical}
    for seq in state.sequences:  # a missing and an unknown id, most recent, in some histories
        unknown = 10**12 if vocabulary[seq.vocabulary].dtype == "int" else "never seen"
        lists = out[seq.column].to_list()
        for i in range(3, n, 5):
            lists[i] = [*(lists[i] or []), None, unknown]
        out = out.with_columns(pl.Series(seq.column, lists, dtype=out[seq.column].dtype))
    for s in state.numeric:
        x = pl.col(s.column).cast(pl.Float64)
        out = out.with_columns(
            pl.when(pl.lit(rows % 6 == 1))
            .then(None)
            .when(pl.lit(rows % 6 == 2))
            .then(float("inf"))
            .when(pl.lit(rows % 6 == 3))
            .then(float("nan"))
            .when(pl.lit(rows % 6 == 4))
            .then(-x)  # negative: log1p clips at 0
            .when(pl.lit(rows % 6 == 5))
            .then(float("-inf"))
            .otherwise(x)
            .alias(s.column)
        )
    return out


@pytest.mark.parametrize("which", ["synthetic", "kuairand", "hashed", "searched"])
def test_the_feature_graph_equals_the_training_transform(which: str, request) -> None:
    data: RankerDataModule = request.getfixturevalue(which)
    frame = with_bad_values(parity_rows(data, 5000), data)
    expected = data.state.transform(frame)
    inputs = raw_inputs(data.state, data.config.features)
    cat, num, sequences, _ = feature_outputs(data, raw_feeds(frame, inputs))
    np.testing.assert_array_equal(cat, expected.cat)
    np.testing.assert_array_equal(num, expected.num)  # float64 math, then float32, as polars
    assert (cat[1::7, 0] == 0).all() and (cat[2::7, 0] == 0).all()  # missing / unknown -> 0
    for seq, got in zip(data.state.sequences, sequences, strict=True):
        np.testing.assert_array_equal(got, expected.sequences[seq.name])
        lengths = expected.lengths[seq.name]
        assert (lengths == 0).any() and (lengths >= seq.max_len).any()  # empty and truncated
        assert (got[lengths == 0] == 0).all()
        assert (got[3::5] == 0).any(axis=1).all()  # the planted missing ids -> 0
    assert which != "hashed" or sum(bool(s.hash_buckets) for s in data.state.categorical) == 2
    for j, s in enumerate(data.state.categorical):
        if s.hash_buckets:  # every id in a bucket (unknown ones too), missing -> 0
            assert cat[:, j].max() <= s.hash_buckets and (cat[1::7, j] == 0).all()
            assert (cat[2::7, j] > 0).all() and len(np.unique(cat[:, j])) > s.hash_buckets // 4


def test_one_request_row_broadcasts_over_the_candidates(synthetic: RankerDataModule) -> None:
    frame = parity_rows(synthetic, 200)
    inputs = raw_inputs(synthetic.state, synthetic.config.features)
    feeds = raw_feeds(frame, inputs)
    request = {i.name: feeds[i.name][:1] if not i.per_candidate else feeds[i.name] for i in inputs}
    cat, num, sequences, request_rows = feature_outputs(synthetic, request)
    assert request_rows == 1  # the request's columns stay one row until the network
    user_first = frame.head(1).select([i.name for i in inputs if not i.per_candidate])
    broadcast = frame.with_columns(
        [pl.Series(c, [user_first[c][0]] * frame.height) for c in user_first.columns]
    )
    expected = synthetic.state.transform(broadcast)
    np.testing.assert_array_equal(cat, expected.cat)
    np.testing.assert_array_equal(num, expected.num)
    np.testing.assert_array_equal(sequences[0], expected.sequences["recent_clicks"])
    assert {i.side for i in inputs} == {"user", "item", "context"}
    session = session_of(preprocessing_model(synthetic.state, synthetic.config.features))
    assert session.get_inputs()[0].type in ("tensor(int64)", "tensor(string)", "tensor(double)")


@pytest.mark.parametrize(
    ("which", "network"),
    [
        ("synthetic", {"class_path": "ranker.models.HoME", "init_args": {"expert_hidden": [32]}}),
        ("kuairand", {"class_path": "ranker.models.MMoE", "init_args": {"num_experts": 3}}),
        ("kuairand", {"class_path": "ranker.models.PLE", "init_args": {"expert_hidden": [32]}}),
        (
            "synthetic",
            {
                "class_path": "ranker.models.MMoE",
                "init_args": {
                    "num_experts": 4,
                    "expert_hidden": [32, 16],
                    "always_on_experts": 1,
                    "routing": {"top_k": 2, "granularity": 2, "balance": 0.01},
                },
            },
        ),
        (
            "searched",  # long histories searched: soft, and hard by the candidate's author
            {"class_path": "ranker.models.HoME", "init_args": {"expert_hidden": [32]}},
        ),
        (
            "searched",  # AW-MoE's gates attend over the searched behaviours
            {
                "class_path": "ranker.models.AWMoE",
                "init_args": {
                    "num_experts": 4,
                    "expert_hidden": [32],
                    "gate_sequence": "by_author",
                },
            },
        ),
        (
            "hashed",  # item and author ids hashed, the history too (attention over it)
            {
                "class_path": "ranker.models.AWMoE",
                "init_args": {"num_experts": 4, "expert_hidden": [32], "routing": {"top_k": 2}},
            },
        ),
    ],
    ids=["home", "mmoe", "ple", "mmoe_topk", "home_search", "aw_moe_search", "aw_moe_hashed"],
)
def test_the_exported_model_matches_torch_on_real_rows(which: str, network: dict, request) -> None:
    data: RankerDataModule = request.getfixturevalue(which)
    torch.manual_seed(0)
    module = RankerModule(
        lambda inputs, tasks: build_network(network, inputs, tasks),
        inputs=data.input_spec,
        tasks=data.tasks,
    ).eval()
    with torch.no_grad():  # BatchNorm statistics away from their initial values
        for p in module.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tasks = len(data.tasks)  # a fitted calibration travels into the graph
    module.calibrator.set(np.linspace(0.5, 1.5, tasks), np.linspace(-0.4, 0.4, tasks))
    model = scorer_graph(module, data.state, data.config)
    if "routing" in network["init_args"] or which == "searched":  # top-k routing or search
        assert "TopK" in {node.op_type for node in model.graph.node}  # is in the graph
    if which == "searched":  # histories empty, shorter than K, longer than L
        lengths = data.state.transform(parity_rows(data, 10_000)).lengths["long_clicks"]
        assert (lengths == 0).any() and ((lengths > 0) & (lengths < 8)).any()
        assert (lengths == 60).any()  # the last L of longer histories (lists hold L)
    parity = check_parity(session_of(model), module, data, rows=10_000, tolerance=1e-5)
    assert parity.rows + parity.ties == 10_000 and parity.max_abs_diff <= 1e-5
    # Rows on a top-k near-tie are left out (another runtime's rounding may route them to
    # other experts): only with top-k routing, and few.
    assert parity.ties <= 100 if "routing" in network["init_args"] else parity.ties == 0
    frame = parity_rows(data, 500)
    inputs = raw_inputs(data.state, data.config.features)
    got = session_of(model).run(["probabilities"], raw_feeds(frame, inputs))[0]
    module.calibrator.set(np.ones(tasks), np.zeros(tasks))
    assert np.abs(got - torch_outputs(module, data.state, frame)[OUTPUT]).max() > 1e-2
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["ranker.tasks"]) == [t.name for t in data.tasks]
    assert [i["name"] for i in json.loads(meta["ranker.inputs"])] == [
        i.name for i in session_of(model).get_inputs()
    ]
    assert int(meta["ranker.null_int"]) == NULL_INT
    with pytest.raises(RunError, match=f"ONNX parity failed on {parity.rows:,} rows"):
        check_parity(session_of(model), module, data, rows=10_000, tolerance=-1.0)


def test_export_registers_a_version_and_promote_moves_the_alias(
    runs: Runs, synthetic: RankerDataModule, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "ranker-test-export"
    first = export(run=runs.home, name=name, out=tmp_path / "a.onnx", tracking_uri=runs.uri)
    assert first.parity.rows == 20_000 and first.parity.max_abs_diff <= 1e-5
    second = export(run=runs.mmoe, name=name, out=tmp_path / "b.onnx", tracking_uri=runs.uri)
    assert (first.version, second.version) == ("1", "2")
    client = MlflowClient(runs.uri)
    assert client.get_model_version(name, "1").run_id == runs.home
    assert client.get_run(runs.home).data.metrics["export/parity_rows"] == 20_000

    # The logged model is the file, with its signature; it scores through MLflow's loader.
    mlflow.set_tracking_uri(runs.uri)
    logged = mlflow.onnx.load_model(f"models:/{name}/1")
    feeds = raw_feeds(
        parity_rows(synthetic, 100), raw_inputs(synthetic.state, synthetic.config.features)
    )
    np.testing.assert_array_equal(
        session_of(logged).run(None, feeds)[0],
        session_of(onnx.load(str(first.path))).run(None, feeds)[0],
    )
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert {s["name"] for s in info.signature.inputs.to_dict()} == {
        i.name for i in logged.graph.input
    }

    assert promote(name=name, alias="champion", version="1", tracking_uri=runs.uri) == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    main(["promote", "--name", name, "--alias", "champion", "--tracking_uri", runs.uri])
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"  # the latest
    assert f"models:/{name}@champion -> version 2" in capsys.readouterr().out


def test_promote_errors_name_what_is_wrong(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["promote", "--name", "no-such-model", "--tracking_uri", runs.uri])
    assert "no registered model 'no-such-model'" in capsys.readouterr().err
    export(
        run=runs.mmoe,
        name="ranker-test-promote",
        register=True,
        tracking_uri=runs.uri,
        quiet=True,
        out=Path(runs.checkpoints) / "p.onnx",
    )
    with pytest.raises(SystemExit):
        main(
            [
                "promote",
                "--name",
                "ranker-test-promote",
                "--version",
                "7",
                "--tracking_uri",
                runs.uri,
            ]
        )
    assert "has no version 7 (versions: [1])" in capsys.readouterr().err
