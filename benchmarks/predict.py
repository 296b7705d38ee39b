"""`ranker predict` throughput and peak memory, by backend and log size.

    python benchmarks/predict.py --model <run id | checkpoint> --rows 1000000 10000000

Each log size is generated once (``ranker synth``, under ``--data``); each (size, backend) is
scored in a fresh subprocess (``ranker predict``), timed end to end, its peak RSS read from
``/proc/<pid>/status`` (VmHWM) while it runs. Prints one table: rows, backend, seconds,
rows/s, peak RSS.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from pipelines.render import wide_console

RANKER = Path(sys.executable).parent / "ranker"


def peak_rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


def run(model: str, log: Path, backend: str, out: Path) -> tuple[float, float]:
    command = [str(RANKER), "predict", "--model", model, "--log_path", str(log)]
    command += ["--out", str(out), "--backend", backend, "--overwrite", "true", "--quiet", "true"]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, peak_rss_mb(process.pid))
        time.sleep(0.2)
    if process.returncode:
        sys.exit(f"ranker predict failed on {log} ({backend})")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="run id or checkpoint")
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--backends", nargs="+", default=["onnx", "torch"])
    parser.add_argument("--data", type=Path, default=Path("data"))
    args = parser.parse_args()
    table = Table(title="ranker predict: end to end (model load, history pre-pass, scoring)")
    for column in ("rows", "backend", "seconds", "rows/s", "peak RSS MB"):
        table.add_column(column, justify="right")
    for rows in args.rows:
        log = args.data / f"predict{rows}"
        if not log.exists():
            subprocess.run(
                [str(RANKER), "synth", "--out", str(log), "--rows", str(rows)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        for backend in args.backends:
            with tempfile.TemporaryDirectory() as out:
                seconds, peak = run(args.model, log, backend, Path(out) / "scores")
            table.add_row(
                f"{rows:,}", backend, f"{seconds:.1f}", f"{rows / seconds:,.0f}", f"{peak:,.0f}"
            )
    wide_console().print(table)


if __name__ == "__main__":
    main()
