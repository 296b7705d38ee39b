"""``POST /v1/uplift`` end to end on a real ``ranker serve`` of an exported MTMT: every arm's
probabilities and uplift equal the graph's on the same customers (from the user table or
sent inline), the best arm follows the weights and costs, and bad input is a 422 naming the
field."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import polars as pl
import pytest

from features.config import DatasetConfig
from features.datamodule import RankerDataModule
from pipelines.export.parity import graph_feeds
from tests.conftest import UpliftRun
from tests.serving.conftest import Server, start, stop

FEATURES = ["region", "tier", "x0", "x1", "x2", "x3"]
TASKS, ARMS = ["visit", "buy"], ["control", "arm1", "arm2"]


@pytest.fixture(scope="module")
def uplift_server(uplift_run: UpliftRun) -> Iterator[Server]:
    running = start("--model", str(uplift_run.exported.path), "--max_users", "100")
    yield running
    stop(running)


@pytest.fixture(scope="module")
def customers(uplift_run: UpliftRun) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """40 logged customers and the graph's outputs for them (arm column dropped)."""
    path = DatasetConfig.from_yaml(uplift_run.config).path
    frame = pl.read_parquet(path).filter(pl.col("split") == "test").head(40).drop("arm")
    session = ort.InferenceSession(
        str(uplift_run.exported.path), providers=["CPUExecutionProvider"]
    )
    feeds = graph_feeds(RankerDataModule(str(uplift_run.config)), frame)
    names = ["arm_probabilities", "uplift"]
    return frame, dict(zip(names, session.run(names, feeds), strict=True))


def served(answer: dict, key: str) -> np.ndarray:
    """``[N, K, T]`` of each user's treatment arms (``uplift`` or ``probabilities``)."""
    return np.array(
        [[[u["arms"][a][key][t] for t in TASKS] for a in ARMS[1:]] for u in answer["users"]]
    )


def test_every_arm_is_scored_as_the_graph_scores_it_by_id_or_inline(
    uplift_server: Server, customers: tuple[pl.DataFrame, dict[str, np.ndarray]]
) -> None:
    frame, graph = customers
    ids = frame["customer"].to_list()
    inline = [
        {"id": -1 - i, "features": {f: row[f] for f in FEATURES}}  # not in the user table
        for i, row in enumerate(frame.iter_rows(named=True))
    ]
    with uplift_server.client() as http:
        described = http.get("/v1/model").json()
        by_id = http.post("/v1/uplift", json={"users": [{"id": i} for i in ids]}).json()
        sent = http.post("/v1/uplift", json={"users": inline}).json()
    assert described["arms"] == ARMS
    assert by_id["control"] == "control"
    for answer in (by_id, sent):
        assert len(answer["users"]) == len(ids)
        np.testing.assert_allclose(served(answer, "uplift"), graph["uplift"], atol=1e-6)
        np.testing.assert_allclose(
            served(answer, "probabilities"), graph["arm_probabilities"][:, 1:], atol=1e-6
        )
        control = [[u["control"][t] for t in TASKS] for u in answer["users"]]
        np.testing.assert_allclose(control, graph["arm_probabilities"][:, 0], atol=1e-6)
    assert [u["id"] for u in by_id["users"]] == ids


def test_the_best_arm_is_the_highest_weighted_uplift_net_of_cost_or_control(
    uplift_server: Server, customers: tuple[pl.DataFrame, dict[str, np.ndarray]]
) -> None:
    frame, graph = customers
    users = [{"id": i} for i in frame["customer"].to_list()]
    weights = {"visit": 1.0, "buy": 3.0}
    gains = graph["uplift"].astype(np.float64) @ np.array([1.0, 3.0])  # [N, 2]
    # Costs at each arm's median gain: some users are worth treating and some are not.
    costs = dict(zip(ARMS[1:], np.median(gains, axis=0).tolist(), strict=True))
    with uplift_server.client() as http:
        answer = http.post(
            "/v1/uplift", json={"users": users, "weights": weights, "costs": costs}
        ).json()
        none_pays = http.post(
            "/v1/uplift", json={"users": users, "costs": {"arm1": 9.0, "arm2": 9.0}}
        ).json()
        only_arm2 = http.post("/v1/uplift", json={"users": users, "arms": ["arm2"]}).json()
    values = gains - np.array(list(costs.values()))
    expected = np.where(values.max(1) > 0, np.array(ARMS[1:])[values.argmax(1)], "control")
    assert [u["best_arm"] for u in answer["users"]] == expected.tolist()
    np.testing.assert_allclose(
        [u["value"] for u in answer["users"]], np.maximum(values.max(1), 0), atol=1e-6
    )
    assert 0 < (expected == "control").sum() < len(expected)  # both outcomes are exercised
    assert {u["best_arm"] for u in none_pays["users"]} == {"control"}
    assert all(u["value"] == 0.0 for u in none_pays["users"])
    assert all(set(u["arms"]) == {"arm2"} for u in only_arm2["users"])
    arm2 = graph["uplift"][:, 1].astype(np.float64).sum(1)
    assert [u["best_arm"] for u in only_arm2["users"]] == np.where(
        arm2 > 0, "arm2", "control"
    ).tolist()


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "users"]),
        ({"users": []}, ["body", "users"]),
        ({"users": [{"features": {}}]}, ["body", "users", 0, "id"]),
        ({"users": [{"id": 1}], "arms": ["arm9"]}, ["body", "arms", 0]),
        ({"users": [{"id": 1}], "arms": ["control"]}, ["body", "arms", 0]),
        ({"users": [{"id": 1}], "costs": {"arm9": 1.0}}, ["body", "costs", "arm9"]),
        ({"users": [{"id": 1}], "weights": {"click": 1.0}}, ["body", "weights", "click"]),
        ({"users": [{"id": 1, "features": {"x0": "a"}}]}, ["body", "users", 0, "features", "x0"]),
        ({"users": [{"id": 1, "features": {"zz": 1}}]}, ["body", "users", 0, "features", "zz"]),
        ({"users": [{"id": i} for i in range(101)]}, ["body", "users"]),
    ],
)
def test_bad_input_is_a_422_naming_the_field(uplift_server: Server, body: dict, loc: list) -> None:
    with uplift_server.client() as http:
        answer = http.post("/v1/uplift", json=body)
        assert answer.status_code == 422, answer.text
        assert [d["loc"] for d in answer.json()["detail"]] == [loc]
        assert http.get("/readyz").status_code == 200  # nothing a client sends crashes it


def test_a_ranker_that_is_not_an_uplift_model_answers_404(server: Server) -> None:
    with server.client() as http:
        answer = http.post("/v1/uplift", json={"users": [{"id": 1}]})
    assert answer.status_code == 404
    assert "not an uplift model" in answer.json()["detail"][0]["msg"]
