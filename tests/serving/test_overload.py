"""Admission control, deadlines, the bearer token and the drain on SIGTERM, on a real
``ranker serve`` process.

A request is held in flight deterministically by sending its headers and only part of its
body: the service has admitted it and waits for the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.export import Exported
from serving.api.admission import Admission, DeadlineError
from serving.core.config import Settings
from serving.core.metrics import Metrics
from serving.priority import run_lowered
from tests.serving.conftest import Server, start, stop

BODY = json.dumps(
    {
        "user": {"id": 3},
        "context": {"hour": 10, "page": "featured", "device": "ios"},
        "candidates": [{"id": i} for i in range(1, 51)],
    }
).encode()


class Held:
    """A rank request whose body is sent in two parts, over a raw connection."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        lines = [
            "POST /v1/rank HTTP/1.1",
            f"Host: {host}",
            "Content-Type: application/json",
            f"Content-Length: {len(BODY)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + BODY[:10])

    def finish(self) -> tuple[int, bytes]:
        """Sends the rest of the body; the status and body of the answer."""
        self.sock.sendall(BODY[10:])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < length(answer):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        self.sock.close()
        return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[1]


def length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def one_at_a_time(exported: Exported):
    server = start(
        "--model", str(exported.path), "--max_in_flight", "1", "--scoring_concurrency", "1",
        "--deadline_ms", "60000",  # a held request waits out the test's checks
    )  # fmt: skip
    yield server
    stop(server)


def test_over_the_limit_a_request_is_answered_503_at_once(one_at_a_time: Server) -> None:
    with one_at_a_time.client() as http:
        held = Held(one_at_a_time.url)
        wait_for(lambda: metric(http, "ranker_requests_in_flight") == 1)
        start = time.perf_counter()
        shed = http.post("/v1/rank", content=BODY, headers={"content-type": "application/json"})
        assert time.perf_counter() - start < 1.0
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["detail"][0]["loc"] == ["service"]
        assert metric(http, "ranker_requests_shed_total", reason="overload") == 1
        status, body = held.finish()  # the admitted one is scored as usual
        assert status == 200 and len(json.loads(body)["candidates"]) == 50
        wait_for(lambda: metric(http, "ranker_requests_in_flight") == 0)
        again = http.post("/v1/rank", content=BODY, headers={"content-type": "application/json"})
        assert again.status_code == 200


def test_a_request_past_its_deadline_is_answered_504_and_never_scored(
    one_at_a_time: Server,
) -> None:
    with one_at_a_time.client() as http:
        scored = metric(http, "ranker_candidates_count")
        held = Held(one_at_a_time.url, {"X-Request-Timeout-Ms": "50"})
        time.sleep(0.3)  # its body arrives after its deadline
        status, body = held.finish()
        assert status == 504
        assert "deadline" in json.loads(body)["detail"][0]["msg"]
        assert metric(http, "ranker_requests_shed_total", reason="deadline") == 1
        assert metric(http, "ranker_candidates_count") == scored
        headers = {"content-type": "application/json", "X-Request-Timeout-Ms": "5000"}
        assert http.post("/v1/rank", content=BODY, headers=headers).status_code == 200


@pytest.mark.parametrize("value", ["soon", "-5", "0", "nan", "inf"])
def test_a_bad_deadline_header_is_a_422_naming_it(one_at_a_time: Server, value: str) -> None:
    with one_at_a_time.client() as http:
        headers = {"content-type": "application/json", "X-Request-Timeout-Ms": value}
        answer = http.post("/v1/rank", content=BODY, headers=headers)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["header", "X-Request-Timeout-Ms"]


def test_the_token_guards_v1_and_nothing_else(exported: Exported) -> None:
    env = {**os.environ, "RANKER_SERVE_TOKEN": "s3cret"}
    server = start("--model", str(exported.path), env=env)
    try:
        with server.client() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                refused = http.post("/v1/rank", content=BODY, headers=headers)
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"] == "Bearer"
                assert http.get("/v1/model", headers=headers).status_code == 401
            good = {"Authorization": "Bearer s3cret", "content-type": "application/json"}
            assert http.post("/v1/rank", content=BODY, headers=good).status_code == 200
            assert http.get("/v1/model", headers=good).status_code == 200
            for path in ("/healthz", "/readyz", "/metrics"):
                assert http.get(path).status_code == 200
    finally:
        stop(server)


def test_an_empty_token_is_refused_at_start_up(exported: Exported) -> None:
    env = {**os.environ, "RANKER_SERVE_TOKEN": " "}
    with pytest.raises(RuntimeError, match="token"):
        start("--model", str(exported.path), env=env)


def client_loop(server: Server, outcomes: Counter, lock: threading.Lock) -> None:
    """Rank requests on one keep-alive connection until a new connection is refused."""
    with server.client() as http:
        while True:
            try:
                answer = http.post(
                    "/v1/rank", content=BODY, headers={"content-type": "application/json"}
                )
                outcome = str(answer.status_code)
            except httpx.ConnectError:
                outcome = "refused"
            except httpx.TransportError as err:  # a request lost in flight
                outcome = type(err).__name__
            with lock:
                outcomes[outcome] += 1
            if outcome != "200":
                return


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_every_request_in_flight_and_exits_0(
    exported: Exported, workers: int
) -> None:
    server = start("--model", str(exported.path), "--workers", str(workers))
    outcomes: Counter = Counter()
    lock = threading.Lock()
    clients = [
        threading.Thread(target=client_loop, args=(server, outcomes, lock)) for _ in range(8)
    ]
    for c in clients:
        c.start()
    with server.client() as watcher:
        watcher.get("/healthz")  # a connection open before the signal
        wait_for(lambda: sum(outcomes.values()) >= 40, 60)
        server.process.send_signal(signal.SIGTERM)
        if workers == 1:  # which worker answers is the kernel's choice with 2
            assert watcher.get("/readyz").status_code == 503
    for c in clients:
        c.join(60)
    assert server.process.wait(60) == 0
    assert set(outcomes) == {"200", "refused"}, outcomes  # nothing lost, nothing failed
    assert outcomes["refused"] == 8
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz")


def test_a_turn_not_free_by_the_deadline_is_refused_and_counted() -> None:
    """``Admission.turn``: a request already past its deadline is refused even when a turn is
    free (taking one would not wait); one waiting behind a busy turn is refused at its
    deadline; a refused wait gives no turn away."""
    settings = Settings(model="unused.onnx", scoring_concurrency=1)
    admission = Admission(settings, Metrics())

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        seen = []
        for deadline in (loop.time() - 0.001, loop.time()):
            try:
                async with admission.turn(deadline):
                    seen.append("scored")
            except DeadlineError:
                seen.append("refused")
        async with admission.turn(loop.time() + 5):  # the only turn, held ...
            start = loop.time()
            try:
                async with admission.turn(loop.time() + 0.05):
                    seen.append("scored")
            except DeadlineError:
                waited = loop.time() - start
                seen.append("refused at its deadline" if 0.04 < waited < 2 else f"{waited} s")
        async with admission.turn(loop.time() + 0.05):  # ... and free again
            seen.append("scored")
        return seen

    assert asyncio.run(scenario()) == ["refused", "refused", "refused at its deadline", "scored"]
    assert admission.metrics.shed.labels("deadline")._value.get() == 3


def test_connections_queued_at_the_close_are_taken_not_reset() -> None:
    """What the kernel completed before the drain closes the listening socket (its accept
    queue) is taken first: closing the listener then resets none of it."""
    from serving.drain import accepted

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    callers = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    deadline = time.monotonic() + 5
    taken: list[socket.socket] = []
    while len(taken) < 3 and time.monotonic() < deadline:  # the handshakes complete
        taken += accepted(listener)
    listener.close()
    assert len(taken) == 3
    for caller, connection in zip(callers, taken, strict=True):
        caller.sendall(b"ping")
        connection.setblocking(True)
        assert connection.recv(4) == b"ping"  # alive after the listener closed
        caller.close()
        connection.close()


def niceness(pid: int) -> dict[int, int]:
    """Each thread of a process and its nice value (/proc/<pid>/task/<tid>/stat, field 19)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        found[int(task.name)] = int(fields[16])
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="niceness per thread is Linux's")
def test_the_scoring_threads_run_below_the_event_loop(exported: Exported) -> None:
    """onnxruntime's intra-op threads (made with the session, on a lowered thread) and the
    thread that scores (made for the first request) at ``--scoring_nice``; the event loop's
    main thread as started."""
    server = start("--model", str(exported.path), "--scoring_nice", "10")
    try:
        pid = server.process.pid

        def lowered() -> int:
            return sum(1 for n in niceness(pid).values() if n >= 10)

        sessions = lowered()  # the session's threads: cores - 1 each (the caller is one)
        assert sessions >= (os.cpu_count() or 1) - 1
        with server.client() as http:
            headers = {"content-type": "application/json"}
            assert http.post("/v1/rank", content=BODY, headers=headers).status_code == 200
        assert lowered() == sessions + 1  # the scoring thread
        assert niceness(pid)[pid] == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        stop(server)


def test_a_lowered_thread_passes_its_niceness_on_and_its_outcome_back() -> None:
    def spawn() -> int:
        seen = []
        child = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()
        return seen[0]

    before = os.getpriority(os.PRIO_PROCESS, 0)
    expected = max(7, before) if sys.platform == "linux" else before
    assert run_lowered(7, spawn) == expected  # started on the lowered thread: inherited
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller's own is unchanged
    with pytest.raises(ZeroDivisionError):
        run_lowered(7, lambda: 1 / 0)


def test_a_refused_niceness_leaves_scoring_at_the_same_priority(monkeypatch, caplog) -> None:
    """A sandbox that forbids ``setpriority``: the scoring runs (a broken executor would fail
    every request), with a warning."""

    def refused(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refused)
    monkeypatch.setattr(os, "getpriority", lambda *args: 0)
    monkeypatch.setattr(sys, "platform", "linux")
    caplog.set_level(logging.WARNING, logger="ranker.serving")
    assert run_lowered(10, lambda: "scored") == "scored"
    assert "keep the event loop's priority" in caplog.text
