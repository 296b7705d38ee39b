"""The service under overload and SIGTERM: admission control against an unbounded queue.

    python benchmarks/overload.py --model model.onnx [--candidates 500] [--seconds 6]
        [--loads 0.5 1 2 4]

``ranker serve`` on 127.0.0.1 (one worker, its default threads). Its capacity is measured
first (4 clients back to back); then the load is open loop, as independent callers make it:
requests arrive evenly at a multiple of that capacity whatever the answers, each sent by a
free thread of a pool of keep-alive clients, its latency counted from its arrival. Candidate
ids are ``1..N`` and the user ``1`` (unknown ids score through the unknown row: the same work
as known ones). Printed as markdown:

1. per offered load, with admission control off (``--max_in_flight`` 1,000,000 and no
   deadline: every request queued and scored, the behaviour before it) and at the defaults:
   accepted requests per second, their p50 / p99, the 503s and their p50 / p99, the 504s,
   any other answer or error, and the server's resident memory before and after;
2. SIGTERM at the highest load, after half the time: every request's outcome (200, 503, 504,
   a new connection refused, or lost: a transport error on a request already sent), the exit
   code and how long the drain took.

Run it alone: the clients share the machine's cores with the service.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve import markdown, start_server
from benchmarks.suite import machine


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


OFF = ("--max_in_flight", "1000000", "--deadline_ms", "1e9")  # every request queued and scored


class Load:
    """Open-loop load: requests arrive at ``rate`` per second, evenly spaced, whatever the
    answers (callers are independent), each sent by the next free thread of a pool of
    ``POOL`` keep-alive clients; a request's latency counts from its arrival, so a queue
    anywhere (the service's or, past ``POOL`` outstanding requests, the pool's) shows."""

    POOL = 96

    def __init__(self, url: str, body: bytes, rate: float) -> None:
        self.url, self.body, self.rate = url, body, rate
        self.arrivals: queue.Queue[float | None] = queue.Queue()
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}
        self.threads = [threading.Thread(target=self.client) for _ in range(self.POOL)]

    def client(self) -> None:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while (arrival := self.arrivals.get()) is not None:
                try:
                    answer = http.post("/v1/rank", content=self.body, headers=headers)
                    outcome = str(answer.status_code)
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.TransportError as err:  # sent, and no answer came back
                    outcome = f"lost ({type(err).__name__})"
                with self.lock:
                    self.latency.setdefault(outcome, []).append(time.perf_counter() - arrival)

    def run(self, seconds: float, during=None) -> float:
        for t in self.threads:
            t.start()
        start = time.perf_counter()
        if during is not None:
            threading.Thread(target=during, daemon=True).start()
        for k in range(int(self.rate * seconds)):
            time.sleep(max(0.0, start + k / self.rate - time.perf_counter()))
            self.arrivals.put(time.perf_counter())
        for _ in self.threads:
            self.arrivals.put(None)
        for t in self.threads:
            t.join()
        return time.perf_counter() - start

    def counts(self) -> Counter:
        return Counter({k: len(v) for k, v in self.latency.items()})


def capacity(url: str, body: bytes, seconds: float) -> float:
    """Requests per second the service answers with 4 clients back to back."""
    done = Counter()
    lock = threading.Lock()

    def client(stop: float) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < stop:
                http.post("/v1/rank", content=body, headers={"content-type": "application/json"})
                with lock:
                    done["n"] += 1

    stop = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(stop,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done["n"] / seconds


def p(values: list[float], q: float) -> str:
    return f"{np.percentile(np.array(values) * 1e3, q):.1f}" if values else "-"


def table(args, body: bytes, rate: float) -> list[list[str]]:
    rows = []
    for name, options in (("off (queue all)", OFF), ("defaults", ())):
        server, url = start_server(args.model, *options)
        try:
            httpx.post(f"{url}/v1/rank", content=body, timeout=60)  # warm up
            for load_x in args.loads:
                before = rss_mb(server.pid)
                load = Load(url, body, load_x * rate)
                wall = load.run(args.seconds)
                ok, shed = load.latency.get("200", []), load.latency.get("503", [])
                other = {k: v for k, v in load.counts().items() if k not in ("200", "503", "504")}
                rows.append(
                    [name, f"{load_x:g}x ({load_x * rate:.0f}/s)", f"{len(ok) / wall:.1f}",
                     p(ok, 50), p(ok, 99), str(len(shed)), p(shed, 50), p(shed, 99),
                     str(load.counts()["504"]),
                     ", ".join(f"{k}: {v}" for k, v in other.items()) or "0",
                     f"{before:.0f} -> {rss_mb(server.pid):.0f}"]
                )  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(60)
    return rows


def sigterm(args, body: bytes, rate: float) -> list[str]:
    server, url = start_server(args.model)
    httpx.post(f"{url}/v1/rank", content=body, timeout=60)
    load = Load(url, body, max(args.loads) * rate)
    sent: dict[str, float] = {}

    def signal_halfway() -> None:
        time.sleep(args.seconds / 2)
        sent["at"] = time.perf_counter()
        server.send_signal(signal.SIGTERM)

    load.run(args.seconds, signal_halfway)
    code = server.wait(60)
    drained = time.perf_counter() - sent["at"]
    counts = load.counts()
    lost = sum(v for k, v in counts.items() if k.startswith("lost"))
    return [f"{max(args.loads):g}x", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
            str(lost), str(code), f"{drained:.1f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument(
        "--loads",
        type=float,
        nargs="+",
        default=[0.5, 1, 2, 4],
        help="offered load, in multiples of the measured capacity",
    )
    args = parser.parse_args()
    body = json.dumps(
        {"user": {"id": 1}, "candidates": [{"id": i} for i in range(1, args.candidates + 1)]}
    ).encode()
    print(f"{machine()}; {args.candidates} candidates, "
          f"{args.seconds:.0f} s per cell\n", flush=True)  # fmt: skip
    server, url = start_server(args.model)
    try:
        rate = capacity(url, body, args.seconds)
    finally:
        server.terminate()
        server.wait(60)
    print(f"capacity (4 clients back to back, defaults): {rate:.1f} requests/s\n", flush=True)
    headers = ["admission", "offered load", "accepted/s", "p50 ms", "p99 ms", "503s",
               "503 p50 ms", "503 p99 ms", "504s", "other", "RSS MB"]  # fmt: skip
    print(markdown(headers, table(args, body, rate)))
    print()
    headers = ["offered load", "outcomes", "lost", "exit code", "drain s"]
    print(markdown(headers, [sigterm(args, body, rate)]))


if __name__ == "__main__":
    main()
