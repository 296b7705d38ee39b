"""Scoring latency: the ONNX session in process, the service over HTTP, and the torch model.

    python benchmarks/serve.py --run <MLflow run id> [--sizes 10 100 500 1000] [--seconds 5]

For each number of candidates: p50 / p99 latency and throughput of (a) ``session.run`` in
process on ready inputs, and the service's own request assembly + run (``feeds``), (b) the
service (``ranker serve`` on 127.0.0.1) over HTTP at concurrency 1 and 8, (c) the torch model
in eval mode on tensors already transformed (torch gets its features for free). Requests are
one real user of the log with N real item ids, ids only (features from the service's tables).
Then the onnxruntime session options are compared at 500 candidates. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import polars as pl
import torch
from mlflow.tracking import MlflowClient

from features.contract import OUTPUT
from pipelines.checkpoints import load, locate
from pipelines.export import export, parity_rows
from pipelines.tracking import resolve_tracking_uri
from serving.model import Scorer, session_options

RANKER = Path(sys.executable).parent / "ranker"


def timed(call: Callable[[], object], seconds: float) -> np.ndarray:
    call()  # warm up
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return np.array(latencies)


def row(name: str, n: int, latencies: np.ndarray, wall: float | None = None) -> list[str]:
    wall = wall if wall is not None else latencies.sum()
    per_second = len(latencies) / wall
    return [
        name,
        str(n),
        f"{np.percentile(latencies, 50) * 1e3:.2f}",
        f"{np.percentile(latencies, 99) * 1e3:.2f}",
        f"{per_second:,.0f}",
        f"{per_second * n:,.0f}",
    ]


def http_run(url: str, body: dict, clients: int, seconds: float) -> tuple[np.ndarray, float]:
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            http.post("/v1/rank", json=body)  # connection + warm up
            mine = []
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                answer = http.post("/v1/rank", json=body)
                mine.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    errors.append(answer.status_code)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"HTTP errors: {errors[:5]}")
    return np.array(latencies), time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="MLflow run id (or checkpoint path)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500, 1000])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    uri = args.tracking_uri or resolve_tracking_uri()
    exported = export(run=args.run, out=work / "model.onnx", register=False, tracking_uri=uri)
    client = MlflowClient(uri)
    module, data = load(locate(args.run, client, work), client, work)
    network = module.network.eval()
    scorer = Scorer(
        exported.path,
        "bench",
        "local",
        str(exported.path),
        None,
        work / "user_features.parquet",
        work / "item_features.parquet",
    )

    frame = parity_rows(data, 50_000)
    user = frame.row(0, named=True)
    items = frame[data.config.item_key].unique().sort().to_numpy()
    rng = np.random.default_rng(0)
    print(
        f"model {scorer.model_class} from run {args.run}; {len(items):,} distinct items; "
        f"torch {torch.__version__} threads {torch.get_num_threads()}, onnxruntime "
        f"{ort.__version__}\n"
    )

    port = free_port()
    server = subprocess.Popen(
        [str(RANKER), "serve", "--model", str(exported.path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    rows: list[list[str]] = []
    context = {c: user[c] for c in ("hour", "page", "device") if c in user}
    try:
        for n in args.sizes:
            ids = rng.choice(items, size=n, replace=n > len(items)).tolist()
            body = {
                "user": {"id": user[data.config.user_key]},
                "context": context,
                "candidates": [{"id": i} for i in ids],
            }
            feeds = scorer.feeds(body["user"]["id"], {}, context, ids, [None] * n)
            rows.append(
                row(
                    "(a) ONNX session.run, in process",
                    n,
                    timed(lambda f=feeds: scorer.session.run([OUTPUT], f), args.seconds),
                )
            )
            rows.append(
                row(
                    "(a') request assembly + run, in process",
                    n,
                    timed(
                        lambda ids=ids, who=body["user"]["id"]: scorer.score(
                            scorer.feeds(who, {}, context, ids, [None] * len(ids))
                        ),
                        args.seconds,
                    ),
                )
            )
            for clients in (1, 8):
                latencies, wall = http_run(url, body, clients, args.seconds)
                rows.append(row(f"(b) HTTP, concurrency {clients}", n, latencies, wall))
            # torch on the same candidates, features already transformed
            raw = pl.DataFrame({c: np.broadcast_to(v, n) for c, v in feeds.items()})
            labels = [pl.lit(None, dtype=pl.Float32).alias(t.label) for t in data.tasks]
            batch = data.state.transform(raw.with_columns(labels))  # missing markers -> 0
            cat, num = torch.from_numpy(batch.cat), torch.from_numpy(batch.num)

            def torch_call(cat=cat, num=num) -> None:
                with torch.inference_mode():
                    torch.sigmoid(network(cat, num))

            rows.append(row("(c) torch eval, in process", n, timed(torch_call, args.seconds)))
    finally:
        server.terminate()
    headers = ["path", "candidates", "p50 ms", "p99 ms", "requests/s", "candidates/s"]
    print(markdown(headers, rows))

    # onnxruntime session options at 500 candidates
    n = 500
    ids = rng.choice(items, size=n).tolist()
    feeds = scorer.feeds(user[data.config.user_key], {}, context, ids, [None] * n)
    option_rows = []
    for threads in (1, 2):
        for mode in (ort.ExecutionMode.ORT_SEQUENTIAL, ort.ExecutionMode.ORT_PARALLEL):
            for spinning in (False, True):
                options = session_options(threads, spinning)
                options.execution_mode = mode
                session = ort.InferenceSession(
                    str(exported.path), options, providers=["CPUExecutionProvider"]
                )
                latencies = timed(lambda s=session: s.run([OUTPUT], feeds), args.seconds / 2)
                option_rows.append(
                    [
                        f"{threads}",
                        mode.name,
                        "yes" if spinning else "no",
                        f"{np.percentile(latencies, 50) * 1e3:.2f}",
                        f"{np.percentile(latencies, 99) * 1e3:.2f}",
                    ]
                )
    print()
    headers = ["intra-op threads", "execution mode", "spin-wait", "p50 ms", "p99 ms"]
    print(markdown(headers, option_rows))


if __name__ == "__main__":
    main()
