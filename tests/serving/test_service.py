"""`ranker serve` as a real uvicorn process: answers, bad input, start-up errors, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from features.contract import OUTPUT, Fusion
from pipelines.checkpoints import load, locate
from pipelines.export import Exported
from pipelines.export.parity import parity_rows, torch_outputs
from pipelines.predict import output_frame
from tests.conftest import Runs
from tests.serving.conftest import RANKER, Server, free_port, start, stop

USER_COLUMNS = ("user_gender", "user_age", "user_city_tier", "user_active_degree")
USER_NUMBERS = ("user_follow_count", "user_register_days")
ITEM_COLUMNS = ("author_id", "item_category", "item_duration_s", "item_upload_days")
CONTEXT = ("hour", "page", "device")
HISTORY = "recent_clicks"


@pytest.fixture(scope="module")
def scored(runs: Runs, tmp_path_factory: pytest.TempPathFactory):
    """One user's real rows, and the torch model's probabilities for them."""
    client = MlflowClient(runs.uri)
    download = tmp_path_factory.mktemp("download")
    module, data = load(locate(runs.home, client, download), client, download)
    frame = parity_rows(data, 5000)
    user = frame["user_id"].mode()[0]
    rows = frame.filter(pl.col("user_id") == user).unique("item_id", maintain_order=True).head(40)
    first = rows.head(1)
    # The request's user, history and context are the first row's, for every candidate.
    rows = rows.with_columns(
        [
            pl.Series(c, [first[c][0]] * rows.height, dtype=rows[c].dtype)
            for c in (*USER_COLUMNS, *USER_NUMBERS, *CONTEXT, HISTORY)
        ]
    )
    assert len(first[HISTORY][0]) > 0
    return (
        rows,
        torch_outputs(module, data.state, rows)[OUTPUT],
        [t.name for t in module.tasks],
        module,
        data,
    )


def request_of(rows: pl.DataFrame, inline: bool, history: bool = True) -> dict:
    first = rows.row(0, named=True)
    user = {"id": first["user_id"]}
    if inline:
        user["features"] = {c: first[c] for c in (*USER_COLUMNS, *USER_NUMBERS)}
    if history:
        user["history"] = {HISTORY: list(first[HISTORY])}
    candidates = []
    for row in rows.iter_rows(named=True):
        candidate = {"id": row["item_id"]}
        if inline:
            candidate["features"] = {c: row[c] for c in ITEM_COLUMNS}
        candidates.append(candidate)
    return {"user": user, "context": {c: first[c] for c in CONTEXT}, "candidates": candidates}


def test_rank_answers_the_torch_models_probabilities(server: Server, scored) -> None:
    rows, expected, tasks, _, _ = scored
    with server.client() as http:
        answer = http.post("/v1/rank", json=request_of(rows, inline=True))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        by_id = {c["id"]: c for c in body["candidates"]}
        got = np.array([[by_id[i]["probabilities"][t] for t in tasks] for i in rows["item_id"]])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        scores = [c["score"] for c in body["candidates"]]
        assert scores == sorted(scores, reverse=True)  # sorted by the fused score (sum)
        np.testing.assert_allclose(scores, np.sort(expected.sum(axis=1))[::-1], atol=1e-4)
        assert body["model"] == {"name": "model", "version": "local"}

        # ids only: the tables fill the same features in (static per user and item in this
        # log), except where the row itself missed a value the snapshot has
        from_tables = http.post("/v1/rank", json=request_of(rows, inline=False)).json()
        by_id = {c["id"]: c for c in from_tables["candidates"]}
        again = np.array([[by_id[i]["probabilities"][t] for t in tasks] for i in rows["item_id"]])
        complete = rows.select(~pl.any_horizontal(pl.col(ITEM_COLUMNS).is_null())).to_series()
        assert complete.sum() >= 30
        np.testing.assert_allclose(again[complete], expected[complete], atol=1e-5)

        top = http.post("/v1/rank", json={**request_of(rows, inline=False), "top_k": 3}).json()
        assert [c["id"] for c in top["candidates"]] == [
            c["id"] for c in from_tables["candidates"][:3]
        ]


def probabilities(answer: dict, ids: list, tasks: list[str]) -> np.ndarray:
    by_id = {c["id"]: c for c in answer["candidates"]}
    return np.array([[by_id[i]["probabilities"][t] for t in tasks] for i in ids])


def test_histories_from_the_user_table_and_inline(server: Server, scored, exported) -> None:
    """Without a history the user table's latest one scores; an inline one overrides it, its
    most recent ``max_len`` kept; unknown and unparsable ids score as unknown."""
    rows, _, tasks, module, data = scored
    user = rows["user_id"][0]
    table = pl.read_parquet(exported.path.parent / "user_features.parquet")
    latest = table.filter(pl.col("user_id") == user)[HISTORY][0]
    assert len(latest) == 20  # the snapshot: the user's last 20 clicks in the whole log
    as_table = rows.with_columns(pl.Series(HISTORY, [latest] * rows.height))
    expected = torch_outputs(module, data.state, as_table)[OUTPUT]
    ids = rows["item_id"].to_list()
    with server.client() as http:
        plain = http.post("/v1/rank", json=request_of(rows, inline=True, history=False)).json()
        np.testing.assert_allclose(probabilities(plain, ids, tasks), expected, atol=1e-5)
        longer = request_of(rows, inline=True)
        longer["user"]["history"] = {HISTORY: [10**15, "junk", *range(50), *latest]}
        again = http.post("/v1/rank", json=longer).json()
        np.testing.assert_allclose(probabilities(again, ids, tasks), expected, atol=1e-5)
        unknown = request_of(rows, inline=True)
        unknown["user"]["history"] = {HISTORY: [10**15, "junk", -3, 2**70]}
        empty = rows.with_columns(pl.Series(HISTORY, [[]] * rows.height, dtype=rows[HISTORY].dtype))
        answer = http.post("/v1/rank", json=unknown)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(
            probabilities(answer.json(), ids, tasks),
            torch_outputs(module, data.state, empty)[OUTPUT],
            atol=1e-5,
        )


def test_health_model_and_metrics_endpoints(server: Server, exported: Exported) -> None:
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"ready": True}
        model = http.get("/v1/model").json()
        assert model["version"] == "local" and model["model"] == "HoME"
        assert model["graph"] == "optimized at export" and model["quantized"] == "no"
        assert len(model["tasks"]) == 8 and model["user_table_rows"] > 0
        assert {i["name"] for i in model["inputs"]} >= {"user_id", "item_id", "hour"}
        http.post("/v1/rank", json={"user": {"id": 1}, "candidates": [{"id": 1}] * 7})
        metrics = http.get("/metrics").text
        assert 'ranker_requests_total{endpoint="/v1/rank",status="200"}' in metrics
        assert "ranker_request_seconds_bucket" in metrics and "ranker_candidates_bucket" in metrics
        assert 'ranker_model_info{name="model",version="local"} 1.0' in metrics


BAD = [
    ("malformed json", b'{"user": {"id": 1}, "candidates": [', ["body"]),
    (
        "user id of the wrong type",
        {"user": {"id": [1]}, "candidates": [{"id": 1}]},
        ["body", "user", "id"],
    ),
    ("no user", {"candidates": [{"id": 1}]}, ["body", "user"]),
    ("no candidates", {"user": {"id": 1}, "candidates": []}, ["body", "candidates"]),
    (
        "too many candidates",
        {"user": {"id": 1}, "candidates": [{"id": i} for i in range(501)]},
        ["body", "candidates"],
    ),
    (
        "NaN",
        b'{"user": {"id": 1}, "context": {"hour": NaN}, "candidates": [{"id": 1}]}',
        ["body", "context", "hour"],
    ),
    (
        "infinity",
        b'{"user": {"id": 1}, "candidates": [{"id": 1, "features": {"item_duration_s": 1e999}}]}',
        ["body", "candidates", 0, "features", "item_duration_s"],
    ),
    (
        "string for an integer id",
        {"user": {"id": 1}, "candidates": [{"id": 1, "features": {"item_category": "x"}}]},
        ["body", "candidates", 0, "features", "item_category"],
    ),
    (
        "string for a number",
        {"user": {"id": 1, "features": {"user_follow_count": "many"}}, "candidates": [{"id": 1}]},
        ["body", "user", "features", "user_follow_count"],
    ),
    (
        "unknown feature",
        {"user": {"id": 1}, "context": {"weather": "rain"}, "candidates": [{"id": 1}]},
        ["body", "context", "weather"],
    ),
    (
        "item feature on the user",
        {"user": {"id": 1, "features": {"item_category": 3}}, "candidates": [{"id": 1}]},
        ["body", "user", "features", "item_category"],
    ),
    (
        "unknown field",
        {"user": {"id": 1}, "candidates": [{"id": 1}], "debug": True},
        ["body", "debug"],
    ),
    ("top_k of 0", {"user": {"id": 1}, "candidates": [{"id": 1}], "top_k": 0}, ["body", "top_k"]),
    (
        "history that is not a list",
        {"user": {"id": 1, "history": {HISTORY: 5}}, "candidates": [{"id": 1}]},
        ["body", "user", "history", HISTORY],
    ),
    (
        "history of floats",
        {"user": {"id": 1, "history": {HISTORY: [1.5]}}, "candidates": [{"id": 1}]},
        ["body", "user", "history", HISTORY, 0],
    ),
    (
        "unknown history",
        {"user": {"id": 1, "history": {"watched": [1]}}, "candidates": [{"id": 1}]},
        ["body", "user", "history", "watched"],
    ),
    (
        "history as a feature",
        {"user": {"id": 1, "features": {HISTORY: 1}}, "candidates": [{"id": 1}]},
        ["body", "user", "features", HISTORY],
    ),
    (
        "candidate id missing",
        {"user": {"id": 1}, "candidates": [{"features": {}}]},
        ["body", "candidates", 0, "id"],
    ),
]


@pytest.mark.parametrize(("case", "body", "loc"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_422_naming_the_field(server: Server, case: str, body, loc: list) -> None:
    with server.client() as http:
        if isinstance(body, bytes):
            answer = http.post(
                "/v1/rank", content=body, headers={"content-type": "application/json"}
            )
        else:
            answer = http.post("/v1/rank", json=body)
        assert answer.status_code == 422, answer.text
        assert loc in [d["loc"][: len(loc)] for d in answer.json()["detail"]], answer.text


def test_unknown_ids_and_categories_score_through_the_unknown_bucket(server: Server) -> None:
    with server.client() as http:
        body = {
            "user": {"id": 10**15, "features": {"user_gender": "never seen"}},
            "context": {"page": "nowhere", "hour": None},
            "candidates": [
                {"id": 10**15},
                {"id": "not-an-id"},
                {"id": 1, "features": {"item_category": None}},
                {"id": 10**30, "features": {"author_id": -(10**30)}},  # beyond int64
                {"id": "99999999999999999999999"},
            ],
        }
        answer = http.post("/v1/rank", json=body)
        assert answer.status_code == 200, answer.text
        probs = [list(c["probabilities"].values()) for c in answer.json()["candidates"]]
        assert np.isfinite(probs).all() and len(probs) == 5


def test_a_body_over_the_limit_is_413_and_the_service_lives_on(server: Server) -> None:
    with server.client() as http:
        big = {"user": {"id": 1}, "candidates": [{"id": 1, "features": {"author_id": 1}}] * 8000}
        answer = http.post("/v1/rank", json=big)
        assert answer.status_code == 413 and answer.json()["detail"][0]["loc"] == ["body"]
        # the same body streamed without a declared length (chunked)
        payload = json.dumps(big).encode()
        chunks = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
        headers = {"content-type": "application/json"}
        answer = http.post("/v1/rank", content=chunks, headers=headers)
        assert "content-length" not in answer.request.headers
        assert answer.status_code == 413 and answer.json()["detail"][0]["loc"] == ["body"]
        assert http.get("/healthz").status_code == 200
        small = {"user": {"id": 1}, "candidates": [{"id": 2}]}
        assert http.post("/v1/rank", json=small).status_code == 200
        assert (
            'ranker_requests_total{endpoint="/v1/rank",status="413"} 2.0'
            in http.get("/metrics").text
        )


def test_the_service_process_has_no_torch_or_lightning(server: Server) -> None:
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "onnxruntime" in maps
    code = (
        "import sys, serving.main, serving.cli, serving.registry, serving.model\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def start_up_error(*args: str) -> str:
    result = subprocess.run(
        [str(RANKER), "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_start_up_errors_are_clear(exported: Exported, tmp_path: Path) -> None:
    text = tmp_path / "model.onnx"
    text.write_text("not a model")
    assert "is not an ONNX model" in start_up_error("--model", str(text))
    bare = tmp_path / "bare.onnx"
    model = onnx.load(str(exported.path))
    del model.metadata_props[:]
    onnx.save_model(model, str(bare))
    assert "is not a ranker model" in start_up_error("--model", str(bare))
    err = start_up_error("--model", str(exported.path), "--weights", '{"clicks": 2}')
    assert "fusion weights name tasks the model lacks: ['clicks']" in err
    err = start_up_error("--model", str(exported.path), "--weights", "like=inf")
    assert "--weights: Value error, fusion weights must be finite numbers: ['like']" in err
    assert "--workers: Input should be greater than or equal to 1" in start_up_error(
        "--model", str(exported.path), "--workers", "0"
    )
    assert "--model: Field required" in start_up_error()
    assert "no model file at" in start_up_error("--model", str(tmp_path / "missing.onnx"))
    err = start_up_error("--model", str(exported.path), "--user_table", str(tmp_path / "u.parquet"))
    assert "user feature table" in err and "does not exist" in err


def test_predict_and_serve_fuse_the_same_weights_into_the_same_scores(
    exported: Exported, scored
) -> None:
    """One fusion rule (``features.contract.Fusion``): the service's scores are those
    ``ranker predict`` writes for the same probabilities and weights; tasks not named weigh 0."""
    rows, _, tasks, _, _ = scored
    weights = {"click": 1.0, "like": 2.0}
    running = start(
        "--model", str(exported.path), "--fusion", "product", "--weights", json.dumps(weights)
    )
    try:
        with running.client() as http:
            answer = http.post("/v1/rank", json=request_of(rows, inline=True)).json()
            described = http.get("/v1/model").json()
    finally:
        stop(running)
    assert described["fusion"] == "product"
    assert described["weights"] == {t: weights.get(t, 0.0) for t in tasks}
    ids = [c["id"] for c in answer["candidates"]]
    probs = probabilities(answer, ids, tasks)
    served = np.array([c["score"] for c in answer["candidates"]])
    frame = pl.DataFrame({"item_id": ids})
    outputs = {OUTPUT: probs.astype(np.float32)}
    predicted = output_frame(frame, outputs, ["item_id"], tasks, Fusion("product", weights))
    np.testing.assert_allclose(predicted["score"].to_numpy(), served, rtol=1e-5)
    click, like = probs[:, tasks.index("click")], probs[:, tasks.index("like")]
    np.testing.assert_allclose(served, click * like**2, rtol=1e-5)
