"""What a behaviour sequence costs, short or long: deriving histories, a training step, a
scoring request; and the variant configs for the quality runs.

    python benchmarks/sequences.py --derive-rows 10000000 --log-dir /tmp/seqbench
    python benchmarks/sequences.py --write-configs /tmp/long     # quality: see RESULTS.md

The history variants (``VARIANTS``), each on the synthetic config:

- ``none``; ``ta50``: target attention over the last 50 clicks (the short-history baseline);
- ``search200`` / ``search1000``: the last 200 / 1,000 clicks, soft search (SIM / TWIN style:
  the 50 closest to the candidate by embedding), then target attention over those 50;
- ``hard1000``: the last 1,000 clicks, hard search by the candidate's category (the 50 latest
  of that category, an aligned history of categories), then target attention;
- ``ta50+search1000``, ``ta50+hard1000``: the short history beside the searched long one (as
  SIM and TWIN use them).

1. **Deriving histories** (``features.history``) on a generated log of ``--derive-rows`` rows:
   the pre-pass's wall time, the peak RSS of the process that runs it, and the bytes it
   stores (events + positions), beside the same process reading the log without sequences
   (each in a fresh child process).
2. **Training step** (forward, backward, AdamW + SparseAdam) of MMoE and HoME at batch 2,048
   on the synthetic config's inputs for every variant (every position filled: the worst
   case), timed in the same process in alternating blocks.
3. **Scoring** 500 candidates with the service's own code (``Scorer.feeds`` + ``score``) of an
   exported model (random weights) per variant: p50 / p99.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.config import DatasetConfig  # noqa: E402
from features.datamodule import RankerDataModule  # noqa: E402
from features.synth import generate  # noqa: E402
from ranker.loss import masked_bce  # noqa: E402
from ranker.models import build  # noqa: E402
from ranker.module import RankerModule  # noqa: E402

SYNTHETIC = ROOT / "configs" / "data" / "synthetic.yaml"


def history(name: str, length: int, **extra: object) -> dict:
    """A derived history of the last ``length`` clicks (item ids unless ``extra`` says)."""
    return {
        "name": name,
        "kind": "sequence",
        "side": "user",
        "vocabulary_of": "item_id",
        "from_label": "click",
        "timestamp": "ts",
        "max_len": length,
        **extra,
    }


SEARCH = {"pooling": "search", "search_k": 50}
DERIVED = ("none", "ta50", "search1000", "hard1000")  # what the derive and scoring tables show
VARIANTS = {
    "none": [],
    "ta50": [history("recent_clicks", 50, pooling="target_attention")],
    "search200": [history("long_clicks", 200, **SEARCH)],
    "search1000": [history("long_clicks", 1000, **SEARCH)],
    "hard1000": [
        history("long_clicks", 1000, **SEARCH, search_by="long_categories"),
        history("long_categories", 1000, vocabulary_of="item_category", pooling="none"),
    ],
}
# SIM's and TWIN's models: the short history beside the searched long one.
VARIANTS["ta50+search1000"] = VARIANTS["ta50"] + VARIANTS["search1000"]
VARIANTS["ta50+hard1000"] = VARIANTS["ta50"] + VARIANTS["hard1000"]


def dataset_config(directory: Path, log: Path, variant: str) -> Path:
    """The synthetic config on ``log`` with the history of ``variant`` (``VARIANTS``)."""
    raw = yaml.safe_load(SYNTHETIC.read_text())
    raw["path"] = str(log)
    features = [f for f in raw["features"] if f.get("kind") != "sequence"]
    raw["features"] = features + VARIANTS[variant]
    out = directory / f"synthetic-{variant}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


# -- 1. deriving histories, in a child ----------------------------------------------------------


def child_read(config: str, cache: str) -> None:
    """Read the log as training does (checks, pre-pass) and print seconds and peak RSS."""
    from features.source import LogSource

    start = time.perf_counter()
    LogSource(DatasetConfig.from_yaml(config), history_cache=Path(cache))
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in Path(cache).rglob("*.parquet"))
    # VmHWM, not ru_maxrss: the latter keeps the peak of the process this one was forked from.
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1e6
    print(json.dumps({"seconds": seconds, "peak_gb": peak, "stored_gb": stored / 1e9}))


def measure_derive(directory: Path, rows: int) -> list[str]:
    log = directory / f"log{rows}"
    if not log.exists():
        subprocess.run(
            [sys.executable, __file__, "--generate", str(log), "--derive-rows", str(rows)],
            check=True,
        )
    results = {}
    for variant in DERIVED:
        config = dataset_config(directory, log, variant)
        cache = tempfile.mkdtemp(dir=directory)
        out = subprocess.run(
            [sys.executable, __file__, "--child-read", str(config), cache],
            check=True,
            capture_output=True,
            text=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [
        "| history | checks + pre-pass s | peak RSS GB | stored GB | as per-impression lists GB |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, r in results.items():
        length = max((f["max_len"] for f in VARIANTS[variant]), default=0)
        lists = 8 * length * rows * len(VARIANTS[variant]) / 1e9
        lines.append(
            f"| {variant} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['stored_gb']:.3f} | "
            f"{lists:.1f} |"
        )
    return [f"Deriving histories on {rows:,} generated rows", "", *lines]


# -- 2. training step ---------------------------------------------------------------------------


def random_batch(spec, rows: int, rng: torch.Generator) -> tuple:
    cat = torch.stack([torch.randint(0, c, (rows,), generator=rng) for c in spec.cardinalities], 1)
    num = torch.randn(rows, spec.num_numeric, generator=rng)
    sequences = {}
    for s in spec.sequences:
        vocabulary = spec.cardinalities[spec.cat_names.index(s.vocabulary)]
        sequences[s.name] = torch.randint(1, vocabulary, (rows, s.max_len), generator=rng)
    return cat, num, sequences


def step_time(model_name: str, specs: dict, tasks, steps: int, blocks: int) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "model" / f"{model_name}.yaml").read_text())
    network = config["model"]["network"]
    modules = {
        k: RankerModule(lambda i, t: build(network, i, t), inputs=s, tasks=tasks)
        for k, s in specs.items()
    }
    rng = torch.Generator().manual_seed(0)
    batches = {k: random_batch(s, 2048, rng) for k, s in specs.items()}
    labels = torch.randint(0, 2, (2048, len(tasks)), generator=rng).float()
    times: dict[str, list[float]] = {k: [] for k in specs}
    optimisers = {k: m.configure_optimizers() for k, m in modules.items()}
    for block in range(blocks + 1):
        for key, module in modules.items():
            cat, num, sequences = batches[key]
            for _ in range(steps):
                start = time.perf_counter()
                for o in optimisers[key]:
                    o.zero_grad()
                loss, _ = masked_bce(
                    module(cat, num, sequences)["logits"], labels, module.task_weights
                )
                loss.backward()
                for o in optimisers[key]:
                    o.step()
                if block:  # the first block warms up
                    times[key].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def measure_steps(data: dict[str, RankerDataModule], steps: int, blocks: int) -> list[str]:
    specs = {k: d.input_spec for k, d in data.items()}
    tasks = data["none"].tasks
    lines = [
        "| model | " + " | ".join(f"{k} ms" for k in specs) + " | search1000 / ta50 "
        "| hard1000 / ta50 |",
        "|---|" + "---:|" * (len(specs) + 2),
    ]
    for model in ("mmoe", "home"):
        t = step_time(model, specs, tasks, steps, blocks)
        lines.append(
            f"| {model} | "
            + " | ".join(f"{t[k] * 1e3:.1f}" for k in specs)
            + f" | {t['search1000'] / t['ta50']:.2f}x | {t['hard1000'] / t['ta50']:.2f}x |"
        )
    return ["Training step at batch 2,048 (median of alternating blocks)", "", *lines]


# -- 3. scoring ---------------------------------------------------------------------------------


def measure_scoring(data: dict[str, RankerDataModule], directory: Path, seconds: float) -> list:
    import onnx

    from benchmarks.serve import interleaved, percentiles
    from features.contract import ITEM_TABLE, USER_TABLE
    from pipelines.export.graph import scorer_graph
    from pipelines.export.snapshots import feature_snapshots
    from serving.model import Scorer

    lines = ["| model | history | p50 ms | p99 ms |", "|---|---|---:|---:|"]
    for model in ("mmoe", "home"):
        config = yaml.safe_load((ROOT / "configs" / "model" / f"{model}.yaml").read_text())
        network = config["model"]["network"]
        calls = {}
        for key in DERIVED:
            d = data[key]
            torch.manual_seed(0)
            module = RankerModule(
                lambda i, t, n=network: build(n, i, t), inputs=d.input_spec, tasks=d.tasks
            ).eval()
            folder = directory / f"{model}-{key}"
            folder.mkdir(exist_ok=True)
            onnx.save_model(scorer_graph(module, d.state, d.config), str(folder / "model.onnx"))
            for file, frame in feature_snapshots(d).items():
                frame.write_parquet(folder / file)
            scorer = Scorer(
                folder / "model.onnx",
                model,
                "local",
                "bench",
                None,
                folder / USER_TABLE,
                folder / ITEM_TABLE,
            )
            users = scorer.user_table.keys
            items = scorer.item_table.keys[:500].tolist()
            user = int(users[len(users) // 2])

            def call(scorer=scorer, user=user, items=items) -> None:
                scorer.score(scorer.feeds(user, {}, {}, items, [None] * len(items)))

            calls[key] = call
        for key, latencies in interleaved(calls, seconds * len(calls)).items():
            p50, p99 = percentiles(latencies)
            lines.append(f"| {model} | {key} | {p50:.2f} | {p99:.2f} |")
    return ["Scoring 500 candidates in process (Scorer.feeds + score, 2 threads)", "", *lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/seqbench"))
    parser.add_argument("--derive-rows", type=int, default=10_000_000)
    parser.add_argument("--small-rows", type=int, default=300_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--skip-derive", action="store_true")
    parser.add_argument("--skip-steps", action="store_true", help="scoring (and deriving) only")
    parser.add_argument("--only-derive", action="store_true")
    parser.add_argument(
        "--write-configs", type=Path, help="write each variant's dataset config here and stop"
    )
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-read", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, rows=args.derive_rows)
        return
    if args.child_read:
        child_read(*args.child_read)
        return
    if args.write_configs:
        args.write_configs.mkdir(parents=True, exist_ok=True)
        for variant in VARIANTS:
            print(dataset_config(args.write_configs, args.write_configs / "log", variant))
        return
    torch.set_num_threads(2)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.only_derive:
        print("\n".join(measure_derive(args.log_dir, args.derive_rows)))
        return
    small = args.log_dir / f"log{args.small_rows}"
    if not small.exists():
        generate(small, rows=args.small_rows)
    cache = str(args.log_dir / "cache")
    data = {
        v: RankerDataModule(str(dataset_config(args.log_dir, small, v)), history_cache=cache)
        for v in VARIANTS
    }
    from benchmarks.suite import machine
    from benchmarks.train_step import matmul_peak

    print(f"{machine()}; fp32 matmul peak {matmul_peak() / 1e9:.0f} GFLOP/s\n", flush=True)
    if not args.skip_steps:
        print("\n".join([*measure_steps(data, args.steps, args.blocks), ""]), flush=True)
    print("\n".join([*measure_scoring(data, args.log_dir, args.seconds), ""]), flush=True)
    if not args.skip_derive:
        print("\n".join(measure_derive(args.log_dir, args.derive_rows)), flush=True)


if __name__ == "__main__":
    main()
