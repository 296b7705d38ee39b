"""The service under overload and SIGTERM: admission control against an unbounded queue.

    python benchmarks/overload.py --model model.onnx [--candidates 500] [--seconds 6]
        [--loads 0.5 1 2 4]

``ranker serve`` on 127.0.0.1 (one worker, its default threads). Its capacity is measured first
(4 clients back to back); then the load is open loop, as independent callers make it: requests
arrive as a Poisson process (seeded) at a multiple of that capacity whatever the answers, each
sent on an idle connection of a pool of keep-alive connections (one asyncio thread on raw
sockets, so the generator's own cost stays small beside the service's on the shared cores), its
latency counted from its arrival. Candidate ids are ``1..N`` and the user ``1`` (unknown ids
score through the unknown row: the same work as known ones). Printed as markdown:

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
import asyncio
import gc
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve import RANKER, markdown, start_server
from benchmarks.suite import machine


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


OFF = ("--max_in_flight", "1000000", "--deadline_ms", "1e9")  # every request queued and scored


class Load:
    """Open-loop load: requests arrive at ``rate`` per second, whatever the answers, as a
    Poisson process (exponential gaps, seeded): what independent callers make, bursts included
    (evenly spaced arrivals never queue below capacity), each sent on an idle keep-alive
    connection of a pool of at most ``POOL`` (a new one opened while fewer are open); a
    request's latency counts from its arrival, so a queue anywhere (the service's or, past
    ``POOL`` outstanding requests, the pool's) shows. One asyncio thread writes pre-encoded
    HTTP/1.1 requests on raw sockets and reads the answers' status lines, its garbage collector
    off: the load generator's own cost per request stays far below the service's on the cores
    they share (a pool of HTTP client threads measured itself: 503 p99 of 67-242 ms with this
    generator's 8-11)."""

    POOL = 96

    def __init__(self, url: str, body: bytes, rate: float) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port, self.rate = int(port), rate
        self.request = (
            f"POST /v1/rank HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.latency: dict[str, list[float]] = {}

    async def exchange(self, idle: asyncio.Queue, slots: asyncio.Semaphore) -> str:
        async with slots:
            connection = None if idle.empty() else idle.get_nowait()
            try:
                if connection is None:
                    try:
                        connection = await asyncio.open_connection(self.host, self.port)
                    except OSError:
                        return "refused"
                reader, writer = connection
                writer.write(self.request)
                status, keep = await self.answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                if connection is not None:
                    connection[1].close()
                return f"lost ({type(err).__name__})"  # sent, and no answer came back
            if keep:
                idle.put_nowait(connection)
            else:
                writer.close()
            return status

    @staticmethod
    async def answer(reader: asyncio.StreamReader) -> tuple[str, bool]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        lines = head.split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        await reader.readexactly(int(fields.get("content-length", "0")))
        return lines[0].split(" ")[1], fields.get("connection") != "close"

    async def timed(self, idle, slots, arrival: float) -> None:
        outcome = await self.exchange(idle, slots)
        self.latency.setdefault(outcome, []).append(time.perf_counter() - arrival)

    async def drive(self, seconds: float, during) -> float:
        idle, slots = asyncio.Queue(), asyncio.Semaphore(self.POOL)
        if during is not None:
            threading.Thread(target=during, daemon=True).start()
        start, tasks = time.perf_counter(), []
        gaps = np.random.default_rng(0).exponential(1 / self.rate, int(self.rate * seconds))
        for due in start + np.cumsum(gaps):
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(self.timed(idle, slots, time.perf_counter())))
        await asyncio.gather(*tasks)
        while not idle.empty():
            idle.get_nowait()[1].close()
        return time.perf_counter() - start

    def run(self, seconds: float, during=None) -> float:
        gc.disable()  # a collection of the generator's own objects paused it ~50 ms: measured
        try:
            return asyncio.run(self.drive(seconds, during))
        finally:
            gc.enable()

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
        server, url = start_server(args.model, *options, ranker=args.ranker)
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
    server, url = start_server(args.model, ranker=args.ranker)
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
    parser.add_argument(
        "--ranker",
        type=Path,
        default=RANKER,
        help="the ranker command that serves (another checkout's, for a before / after)",
    )
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
    server, url = start_server(args.model, ranker=args.ranker)
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
