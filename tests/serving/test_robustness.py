"""The service under fuzzing, under load, and while its registry alias moves."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pipelines.export import Exported, export
from pipelines.export.registry import promote
from tests.conftest import Runs
from tests.serving.conftest import Server, start, stop

REQUEST = {
    "user": {"id": 3},
    "context": {"hour": 10, "page": "featured", "device": "ios"},
    "candidates": [{"id": i} for i in range(1, 101)],
}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_every_endpoint_never_gets_a_server_error(server: Server, mode) -> None:
    """Requests generated from the service's OpenAPI schema, valid and invalid."""
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/rank", "/v1/model", "/readyz"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        call()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def hammer(url: str, stop_at: threading.Event, seen: Counter, versions: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop_at.is_set():
            try:
                answer = http.post("/v1/rank", json=REQUEST)
                seen[answer.status_code] += 1
                if answer.status_code == 200:
                    versions.append(answer.json()["model"]["version"])
            except httpx.HTTPError as err:
                seen[type(err).__name__] += 1


def run_clients(url: str, clients: int, seconds: float, during=None) -> tuple[Counter, list[str]]:
    stop_at, seen, versions = threading.Event(), Counter(), []
    threads = [
        threading.Thread(target=hammer, args=(url, stop_at, seen, versions)) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    if during is not None:
        during()
    time.sleep(seconds)
    stop_at.set()
    for t in threads:
        t.join(60)
    return seen, versions


def test_a_bounded_load_run_has_no_errors_and_flat_memory(server: Server) -> None:
    """As many clients as ``--max_in_flight`` admits (8): none is shed."""
    run_clients(server.url, 8, 5)  # warm up: allocator pools, thread pool, caches
    before = rss_kb(server.process.pid)
    seen, _ = run_clients(server.url, 8, 15)
    after = rss_kb(server.process.pid)
    assert set(seen) == {200} and seen[200] > 100, seen
    assert after < before * 1.2 + 20_000, (before, after)  # kB: flat within noise


WEIGHTS = {"click": 1.0, "like": 4.0}  # tasks both versions have; the others weigh 0


def hammer_checked(url: str, stop_at: threading.Event, seen: Counter, answers: list) -> None:
    """Like ``hammer``, keeping each answer's version, task list and whether its scores are
    its own probabilities fused with ``WEIGHTS``."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop_at.is_set():
            answer = http.post("/v1/rank", json=REQUEST)
            seen[answer.status_code] += 1
            if answer.status_code == 200:
                body = answer.json()
                first = body["candidates"][0]["probabilities"]
                fused = all(
                    abs(
                        c["score"]
                        - sum(WEIGHTS.get(t, 0.0) * p for t, p in c["probabilities"].items())
                    )
                    < 1e-9
                    for c in body["candidates"]
                )
                answers.append((body["model"]["version"], tuple(first), fused))


def serving_version(http: httpx.Client, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while http.get("/v1/model").json()["version"] != version:
        assert time.monotonic() < deadline, f"version {version} never served"
        time.sleep(0.1)


def broken_version(runs: Runs, name: str, tmp_path: Path) -> str:
    """A registered version whose graph is not ONNX: its download succeeds, its load fails."""
    client = MlflowClient(runs.uri)
    garbage = tmp_path / "garbage" / "model.onnx"
    garbage.parent.mkdir()
    garbage.write_text("not a model")
    run = client.create_run(client.get_experiment_by_name("ranker").experiment_id)
    client.log_artifact(run.info.run_id, str(garbage), "garbage")
    source = f"{run.info.artifact_uri}/garbage"
    return str(client.create_model_version(name, source=source, run_id=run.info.run_id).version)


def test_reloads_to_another_task_list_answer_each_request_from_one_version(
    runs: Runs, exported: Exported, tmp_path: Path
) -> None:
    """The alias moves between a HoME (8 tasks) and an MMoE of 2 tasks, then to a version that
    cannot load, under 8 concurrent clients: no 5xx, every answer's probabilities, scores and
    version from one model, and no download left in the temporary folder."""
    name = exported.name
    first = exported.version
    other = export(
        run=runs.two_tasks, name=name, out=tmp_path / "two.onnx", tracking_uri=runs.uri, quiet=True
    ).version
    broken = broken_version(runs, name, tmp_path)
    tasks = {first: 8, other: 2}
    promote(name=name, alias="champion", version=first, tracking_uri=runs.uri)
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = start(
        "--model", f"models:/{name}@champion", "--tracking_uri", runs.uri, "--poll_seconds",
        "0.3", "--weights", json.dumps(WEIGHTS), env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    stop_at, seen, answers = threading.Event(), Counter(), []
    clients = [
        threading.Thread(target=hammer_checked, args=(server.url, stop_at, seen, answers))
        for _ in range(8)
    ]
    try:
        for t in clients:
            t.start()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for version in (other, first, other):  # three reloads, each across task lists
                time.sleep(1)
                promote(name=name, alias="champion", version=version, tracking_uri=runs.uri)
                serving_version(http, version)
            promote(name=name, alias="champion", version=broken, tracking_uri=runs.uri)
            time.sleep(2)  # several polls, each a failed load
            assert http.get("/v1/model").json()["version"] == other
            metrics = http.get("/metrics").text
    finally:
        stop_at.set()
        for t in clients:
            t.join(60)
        stop(server)
    assert set(seen) == {200}, seen
    assert {version for version, _, _ in answers} == {first, other}
    assert all(len(names) == tasks[version] for version, names, _ in answers)
    assert all(fused for _, _, fused in answers)
    assert 'ranker_model_reloads_total{result="ok"} 3.0' in metrics
    assert 'ranker_model_reloads_total{result="failed"}' in metrics
    assert f'ranker_model_info{{name="{name}",version="{other}"}} 1.0' in metrics
    left = [p.name for p in temp.iterdir() if p.name.startswith("ranker-")]
    assert left == []  # every download removed, the failed ones too


def model_info(http: httpx.Client) -> dict[str, tuple[str, float]]:
    """pid -> (version, value) of ``ranker_model_info`` across the workers."""
    found: dict[str, tuple[str, float]] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "ranker_model_info" and sample.value == 1:
                found[sample.labels["pid"]] = (sample.labels["version"], sample.value)
    return found


def rank_count(http: httpx.Client) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "ranker_requests_total" and labels["endpoint"] == "/v1/rank":
                return sample.value
    return 0.0


def test_two_workers_serve_reload_and_count_together(
    runs: Runs, exported: Exported, tmp_path: Path
) -> None:
    name = exported.name
    newer = export(
        run=runs.two_tasks, name=name, out=tmp_path / "w.onnx", tracking_uri=runs.uri, quiet=True
    ).version
    promote(name=name, alias="champion", version=exported.version, tracking_uri=runs.uri)
    server = start(
        "--model", f"models:/{name}@champion", "--tracking_uri", runs.uri,
        "--poll_seconds", "0.3", "--workers", "2",
    )  # fmt: skip
    answered = 0
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            deadline = time.monotonic() + 60
            while len(model_info(http)) < 2:  # each worker loaded its own model
                assert time.monotonic() < deadline, model_info(http)
                for _ in range(10):  # a new connection each: the workers share them out
                    answered += httpx.post(f"{server.url}/v1/rank", json=REQUEST).status_code == 200
            assert {v for v, _ in model_info(http).values()} == {exported.version}
            promote(name=name, alias="champion", version=newer, tracking_uri=runs.uri)
            while {v for v, _ in model_info(http).values()} != {newer}:  # both reload
                assert time.monotonic() < deadline + 60, model_info(http)
                time.sleep(0.2)
            for _ in range(20):
                answer = httpx.post(f"{server.url}/v1/rank", json=REQUEST)
                assert answer.json()["model"]["version"] == newer
                answered += 1
            assert rank_count(http) == answered  # /metrics sums both workers
            assert len(model_info(http)) == 2
    finally:
        stop(server)
