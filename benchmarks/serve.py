"""Scoring latency: each graph the service can run, the service over HTTP, and the torch model.

    python benchmarks/serve.py --run <MLflow run id> [--sizes 10 100 500 1000] [--seconds 4]
        [--also other.onnx ...]          # graphs exported by other code, timed alongside
        [--in-process-only]              # skip the HTTP and workers tables

The run is exported twice (float32 and ``--quantize int8``), each with its optimised graph.
Requests are one real user of the log with N real item ids, ids only (features from the
service's tables). Printed as markdown tables:

1. **In process**, per number of candidates, every graph timed in interleaved rounds on the
   same request (so machine noise falls on all alike): ``session.run`` on the service's own
   request assembly, p50 / p99, and each graph's session start-up time. Torch eval runs on N
   transformed rows of the log (torch gets its features for free).
2. **Over HTTP**: ``ranker serve`` (the float model, optimised at export) at concurrency 1
   and 8, with the ratio of its p99 to the in-process p99.
3. **Threads and workers** at 500 candidates over HTTP: ``--workers`` x ``--threads``.
4. **INT8**: each task's AUC change on held-out rows (what export accepted it with).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import torch
from mlflow.tracking import MlflowClient

from features.contract import OUTPUT, optimized_path, resolve_tracking_uri
from features.datamodule import to_tensors
from pipelines.checkpoints import load, locate
from pipelines.export import Exported, export
from pipelines.export.parity import parity_rows
from ranker.scoring import batch_outputs
from serving.model import Scorer, session_options

RANKER = Path(sys.executable).parent / "ranker"
ROUNDS = 8


def percentiles(latencies: list[float]) -> tuple[float, float]:
    a = np.array(latencies) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def interleaved(calls: dict[str, Callable[[], object]], seconds: float) -> dict[str, list[float]]:
    """Each call timed for ``seconds`` in all, in ``ROUNDS`` alternating slices."""
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            call()  # warm up after the other calls ran
            end = time.perf_counter() + seconds / ROUNDS
            while time.perf_counter() < end:
                start = time.perf_counter()
                call()
                latencies[name].append(time.perf_counter() - start)
    return latencies


def http_run(
    url: str, body: dict, clients: int, seconds: float, path: str = "/v1/rank"
) -> tuple[list[float], float]:
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            http.post(path, json=body)  # connection + warm up
            mine = []
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                answer = http.post(path, json=body)
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
    return latencies, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *options: str, ranker: Path = RANKER) -> tuple[subprocess.Popen, str]:
    """``ranker serve`` on a free port, once ready: the process and its URL (``ranker``: the
    command, e.g. another checkout's, to compare versions)."""
    port = free_port()
    command = [str(ranker), "serve", "--model", str(model), "--port", str(port), *options]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("ranker serve did not start")


@contextmanager
def served(model: Path, *options: str) -> Iterator[str]:
    server, url = start_server(model, *options)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(30)


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def graphs(float32: Exported, int8: Exported, also: list[Path]) -> dict[str, Path]:
    found = {
        "float32, optimised at start-up": float32.path,
        "float32, optimised at export": optimized_path(float32.path),
        "int8, optimised at export": optimized_path(int8.path),
    }
    found.update({f"{p} (--also)": p for p in also})
    return found


def sessions(paths: dict[str, Path]) -> tuple[dict[str, ort.InferenceSession], dict[str, float]]:
    """One session per graph, and the best of 3 start-ups (session creation) of each."""
    made, startup = {}, {}
    for name, path in paths.items():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            made[name] = ort.InferenceSession(
                str(path), session_options(None), providers=["CPUExecutionProvider"]
            )
            times.append(time.perf_counter() - start)
        startup[name] = min(times)
    return made, startup


def in_process(args, scorer, made, torch_call, user, items, rng) -> tuple[list, dict]:
    rows, p99_at = [], {}
    for n in args.sizes:
        ids = rng.choice(items, size=n, replace=n > len(items)).tolist()
        feeds = scorer.feeds(user, {}, {}, ids, [None] * n)
        calls = {name: (lambda s=s, f=feeds: s.run([OUTPUT], f)) for name, s in made.items()}
        calls["request assembly + run (served graph)"] = lambda ids=ids: scorer.score(
            scorer.feeds(user, {}, {}, ids, [None] * len(ids))
        )
        calls["torch eval (features given)"] = torch_call(n)
        for name, latencies in interleaved(calls, args.seconds).items():
            p50, p99 = percentiles(latencies)
            rows.append([name, str(n), f"{p50:.2f}", f"{p99:.2f}", f"{n / p50 * 1e3:,.0f}"])
            p99_at[(name, n)] = p99
    return rows, p99_at


def torch_caller(module, data, rows: int) -> Callable[[int], Callable[[], object]]:
    """Torch's scoring path (``ranker.scoring``) on ``n`` transformed rows: the reference."""
    batch = to_tensors(data.state.transform(parity_rows(data, rows)))
    module.eval()

    def make(n: int) -> Callable[[], object]:
        part = batch.map(lambda t: t[:n])

        def call() -> None:
            with torch.inference_mode():
                batch_outputs(module.network, part, module.calibrator)

        return call

    return make


def over_http(args, model: Path, body_of, p99_at: dict) -> list[list[str]]:
    rows = []
    with served(model) as url:
        for n in args.sizes:
            for clients in (1, 8):
                latencies, wall = http_run(url, body_of(n), clients, args.seconds)
                p50, p99 = percentiles(latencies)
                in_p99 = p99_at[("request assembly + run (served graph)", n)]
                rows.append(
                    [str(n), str(clients), f"{p50:.2f}", f"{p99:.2f}",
                     f"{len(latencies) / wall:,.0f}", f"{p99 / in_p99:.2f}x"]
                )  # fmt: skip
    return rows


def workers_and_threads(args, model: Path, body: dict) -> list[list[str]]:
    rows = []
    for workers, threads in ((1, 2), (1, 1), (2, 1)):
        options = ("--workers", str(workers), "--threads", str(threads))
        with served(model, *options) as url:
            for clients in (1, 8):
                latencies, wall = http_run(url, body, clients, args.seconds)
                p50, p99 = percentiles(latencies)
                rows.append(
                    [str(workers), str(threads), str(clients), f"{p50:.2f}", f"{p99:.2f}",
                     f"{len(latencies) / wall:,.0f}"]
                )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="MLflow run id (or checkpoint path)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500, 1000])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="more graphs to time")
    parser.add_argument("--in-process-only", action="store_true", help="tables 1 and 4 only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    uri = resolve_tracking_uri(args.tracking_uri)
    exported = {
        kind: export(
            run=args.run, out=work / kind / "model.onnx", register=False, tracking_uri=uri,
            quantize=kind, quantize_tolerance=1.0, quiet=True,  # reported below, not refused
        )
        for kind in ("none", "int8")
    }  # fmt: skip
    float32, int8 = exported["none"], exported["int8"]
    client = MlflowClient(uri)
    module, data = load(locate(args.run, client, work), client, work)
    tables = [float32.path.parent / f for f in ("user_features.parquet", "item_features.parquet")]
    served_path = float32.path
    scorer = Scorer(served_path, "bench", "local", "", None, *tables, optimized_path(served_path))
    frame = parity_rows(data, 50_000)
    user = frame.row(0, named=True)[data.config.user_key]
    items = frame[data.config.item_key].unique().sort().to_numpy()
    rng = np.random.default_rng(0)
    print(
        f"model {scorer.model_class} from run {args.run}; {len(items):,} distinct items; "
        f"torch {torch.__version__} threads {torch.get_num_threads()}, onnxruntime "
        f"{ort.__version__}\n"
    )

    made, startup = sessions(graphs(float32, int8, args.also))
    print(
        markdown(
            ["graph", "session start-up ms"], [[k, f"{v * 1e3:.1f}"] for k, v in startup.items()]
        )
    )
    rows, p99_at = in_process(
        args, scorer, made, torch_caller(module, data, max(args.sizes)), user, items, rng
    )
    print()
    print(markdown(["in process", "candidates", "p50 ms", "p99 ms", "candidates/s at p50"], rows))

    def body_of(n: int) -> dict:
        ids = np.random.default_rng(n).choice(items, size=n, replace=n > len(items)).tolist()
        return {"user": {"id": user}, "candidates": [{"id": i} for i in ids]}

    if not args.in_process_only:
        print()
        headers = ["candidates", "clients", "p50 ms", "p99 ms", "requests/s"]
        headers.append("p99 / in-process p99")
        print(markdown(headers, over_http(args, served_path, body_of, p99_at)))
        print()
        headers = ["workers", "threads each", "clients", "p50 ms", "p99 ms", "requests/s"]
        print(markdown(headers, workers_and_threads(args, served_path, body_of(500))))
    print()
    change = int8.int8
    rows = [
        [t, f"{change.rows[t]:,}", f"{change.float_auc[t]:.4f}", f"{change.int8_auc[t]:.4f}",
         f"{change.change[t]:+.4f}"]
        for t in change.float_auc
    ]  # fmt: skip
    print(markdown(["task", "held-out rows", "AUC float32", "AUC int8", "change"], rows))
    task, worst = change.worst()
    verdict = "accepts" if abs(worst) <= 0.001 else "refuses"
    print(f"\nworst: {task} {worst:+.4f}; export's default tolerance (0.001) {verdict} it")


if __name__ == "__main__":
    main()
