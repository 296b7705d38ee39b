"""Continual training over a generated log's days: the daily warm-start loop against training
from scratch, a frozen vocabulary and hashed ids.

    ranker synth --rows 300000 --new_items 0.3 --out data/new_items
    python benchmarks/continual.py --log data/new_items [--model configs/model/mmoe.yaml]
        [--variants warm scratch frozen hashed] [--epochs 1] [--work continual]
        [--fit-args "--data.batch_size 512"]

Every day d (1 .. D - 2) each variant trains on day d alone and validates on day d + 1 (the
checkpoint and the calibration; one epoch leaves nothing to choose), and is scored on day
d + 1: the next day, as a model trained overnight serves it.

- ``warm``: the daily loop of the README. Day 1 trains cold, is exported and promoted to
  ``@champion``; every later day warm-starts from ``models:/<name>@champion`` (vocabularies
  grown with the day's ids), is compared with the champion on day d + 1 (``ranker compare
  --dataset``) and is exported and promoted when its mean AUC there is at least the champion's.
- ``scratch``: a new model every day, its vocabularies fitted on the day.
- ``frozen``: warm-started from the previous day's frozen model with the first day's
  vocabularies (``--data.grow_vocabulary false``): new ids score as unknown.
- ``hashed``: item and author ids hashed (``hash_buckets``), warm-started from the previous
  day's hashed model.

Printed (and written to ``<work>/continual.md``): per day and variant, the next day's mean
AUC and GAUC over tasks, the mean AUC on rows whose item was released that day, and the
wall time of ``ranker fit``; then each variant's mean over the days. MLflow runs go to
``<work>/mlflow.db``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features.contract import OUTPUT
from pipelines.checkpoints import load, locate
from pipelines.commands import main as ranker
from pipelines.evaluate import compare
from pipelines.export import export
from pipelines.export.parity import torch_outputs
from pipelines.export.registry import promote
from ranker.metrics import auc, gauc

ROOT = Path(__file__).resolve().parents[1]
NAME = "ranker-daily"
VARIANTS = ("warm", "scratch", "frozen", "hashed")


def day_config(base: str, log: Path, day: date, out: Path, hashed: dict[str, int]) -> Path:
    """The base dataset config on ``log``: train on ``day``, validate on the next, test on the
    one after; ``hashed`` features get ``hash_buckets``."""
    text = re.sub(r"(?m)^path: .*$", f"path: {log.resolve()}", Path(base).read_text())
    split = (
        f"split:\n  train_start: {day}\n  train_end: {day}\n"
        f"  val_end: {day + timedelta(1)}\n  test_end: {day + timedelta(2)}\n"
    )
    text = re.sub(r"(?m)^split:\n(?:  .*\n)+", split, text)
    for name, buckets in hashed.items():
        text, found = re.subn(
            rf"(\{{name: {name}, kind: categorical[^}}]*)\}}",
            rf"\1, hash_buckets: {buckets}}}",
            text,
        )
        assert found == 1, f"no categorical feature {name} in {base}"
    path = out / f"{'hashed-' if hashed else ''}{day}.yaml"
    path.write_text(text)
    return path


def fit(args, dataset: Path, uri: str, checkpoints: Path, *extra: str) -> tuple[str, float]:
    """``ranker fit`` in process: its run id and wall time."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ranker(
            ["fit", "--config", str(ROOT / "configs" / "trainer.yaml"), "--config", args.model,
             "--data.dataset", str(dataset), "--trainer.max_epochs", str(args.epochs),
             "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
             "--trainer.logger.init_args.tracking_uri", uri,
             "--trainer.logger.init_args.checkpoint_dir", str(checkpoints),
             *shlex.split(args.fit_args), *extra]
        )  # fmt: skip
    seconds = time.perf_counter() - start
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ranker")
    latest = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    return latest.info.run_id, seconds


def next_day(run: str, client: MlflowClient, dataset: Path, day_index: int) -> dict[str, float]:
    """Mean AUC and GAUC over tasks on the validation day, and mean AUC on its rows whose item
    was released that day (``item_upload_days`` = minus the release day)."""
    with tempfile.TemporaryDirectory() as work:
        module, data = load(locate(run, client, Path(work)), client, Path(work), str(dataset))
    frame = data.source.scan("val").collect(engine="streaming")
    batch = data.state.transform(frame)
    probs = torch_outputs(module, data.state, frame)[OUTPUT]
    young = (frame["item_upload_days"] == -day_index).to_numpy()
    out: dict[str, list[float]] = {"auc": [], "gauc": [], "auc_young": []}
    for t in range(probs.shape[1]):
        seen = ~np.isnan(batch.labels[:, t])
        p, y = probs[seen, t], batch.labels[seen, t]
        out["auc"].append(auc(p, y))
        out["gauc"].append(gauc(p, y, batch.users[seen]))
        out["auc_young"].append(auc(p[young[seen]], y[young[seen]]))
    return {k: float(np.nanmean(v)) for k, v in out.items()} | {"young_rows": int(young.sum())}


def champion_step(run: str, dataset: Path, uri: str, out: Path, day: date) -> str:
    """Compare ``run`` with the champion on the next day; export and promote it if it does at
    least as well (the first day: always). Returns what happened."""
    client = MlflowClient(uri)
    try:
        champion = client.get_model_version_by_alias(NAME, "champion").run_id
    except MlflowException:  # no champion yet
        champion = None
    verdict = "first"
    if champion:
        old, new = compare(
            [champion, run],
            "val",
            out / "compare" / str(day),
            uri,
            quiet=True,
            dataset=str(dataset),
        )
        better = new.metrics["auc/mean"] >= old.metrics["auc/mean"]
        verdict = f"{'promoted' if better else 'kept champion'} ({new.metrics['auc/mean']:.4f} vs "
        verdict += f"{old.metrics['auc/mean']:.4f})"
        if not better:
            return verdict
    exported = export(run=run, name=NAME, out=out / "onnx" / str(day) / "model.onnx",
                      tracking_uri=uri, quiet=True)  # fmt: skip
    promote(name=NAME, alias="champion", version=exported.version, tracking_uri=uri)
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="a `ranker synth --new_items` log")
    parser.add_argument("--dataset", default=str(ROOT / "configs" / "data" / "synthetic.yaml"))
    parser.add_argument("--model", default=str(ROOT / "configs" / "model" / "mmoe.yaml"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fit-args", default="", help="more `ranker fit` flags, one string")
    parser.add_argument("--hash-buckets", type=int, nargs=2, default=[1 << 17, 1 << 14],
                        help="buckets of item_id and author_id (hashed variant)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("continual"))
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    client, checkpoints = MlflowClient(uri), args.work / "checkpoints"
    days = sorted(date.fromisoformat(p.name.removeprefix("date=")) for p in args.log.glob("date=*"))
    hashed = dict(zip(("item_id", "author_id"), args.hash_buckets, strict=True))
    previous: dict[str, str] = {}
    rows = []
    for index, day in enumerate(days[:-2]):
        plain = day_config(args.dataset, args.log, day, args.work, {})
        for variant in args.variants:
            dataset = day_config(args.dataset, args.log, day, args.work, hashed) if (
                variant == "hashed") else plain  # fmt: skip
            extra: list[str] = []
            if index and variant == "warm":
                extra = ["--warm_start", f"models:/{NAME}@champion"]
            elif index and variant in ("frozen", "hashed"):
                extra = ["--warm_start", previous[variant]]
                extra += ["--data.grow_vocabulary", "false"] if variant == "frozen" else []
            run, seconds = fit(args, dataset, uri, checkpoints, *extra)
            previous[variant] = run
            scores = next_day(run, client, dataset, index + 1)
            note = champion_step(run, dataset, uri, args.work, day) if (
                variant == "warm") else ""  # fmt: skip
            rows.append({"day": str(day), "variant": variant, **scores, "fit_s": seconds,
                         "note": note})  # fmt: skip
            print(rows[-1], flush=True)
    report(pl.DataFrame(rows), args.work / "continual.md")


def report(frame: pl.DataFrame, path: Path) -> None:
    def table(df: pl.DataFrame) -> str:
        lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
        for row in df.iter_rows():
            cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    means = (
        frame.group_by("variant", maintain_order=True)
        .agg(
            pl.col("auc", "gauc", "auc_young").mean(),
            pl.col("young_rows").sum(),
            pl.col("fit_s").mean(),
        )
        .with_columns(pl.col("fit_s").round(1).cast(pl.String))
    )
    seconds = pl.col("fit_s").round(1).cast(pl.String)
    text = f"{table(frame.with_columns(seconds))}\n\nmean over days:\n\n"
    text += table(means) + "\n"
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
