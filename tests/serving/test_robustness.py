"""The service under fuzzing, under load, and while its registry alias moves."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from mlflow.tracking import MlflowClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pipelines.export import Exported, export, promote
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
    run_clients(server.url, 16, 5)  # warm up: allocator pools, thread pool, caches
    before = rss_kb(server.process.pid)
    seen, _ = run_clients(server.url, 16, 30)
    after = rss_kb(server.process.pid)
    assert set(seen) == {200} and seen[200] > 100, seen
    assert after < before * 1.2 + 20_000, (before, after)  # kB: flat within noise


@pytest.fixture()
def alias_server(runs: Runs, exported: Exported, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    name = exported.name  # version 1 (HoME) exists; the alias starts there
    promote(name=name, alias="champion", version=exported.version, tracking_uri=runs.uri)
    running = start(
        "--model", f"models:/{name}@champion", "--tracking_uri", runs.uri, "--poll_seconds", "0.5"
    )
    yield running, name
    stop(running)


def test_hot_reload_under_concurrent_requests_loses_nothing(
    runs: Runs, exported: Exported, alias_server: tuple[Server, str], tmp_path: Path
) -> None:
    server, name = alias_server
    newer = export(
        run=runs.mmoe, name=name, out=tmp_path / "m.onnx", tracking_uri=runs.uri, quiet=True
    )

    def move_alias() -> None:
        time.sleep(2)
        promote(name=name, alias="champion", version=newer.version, tracking_uri=runs.uri)

    seen, versions = run_clients(server.url, 8, 15, during=move_alias)
    assert set(seen) == {200}, seen
    assert versions[0] == exported.version and versions[-1] == newer.version
    switched = versions.index(newer.version)
    # after the swap only requests already in flight (at most one per client) end on the old
    assert versions[switched:].count(exported.version) <= 8
    assert versions[-50:] == [newer.version] * 50
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/v1/model").json()["model"] == "MMoE"
        metrics = http.get("/metrics").text
    assert 'ranker_model_reloads_total{result="ok"} 1.0' in metrics
    assert f'ranker_model_info{{name="{name}",version="{newer.version}"}} 1.0' in metrics
    assert MlflowClient(runs.uri).get_model_version_by_alias(name, "champion").run_id == runs.mmoe
