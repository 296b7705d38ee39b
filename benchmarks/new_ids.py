"""How runs score ids never seen in training: metrics on a split's rows whose id is unknown to
the vocabulary (index 0) against rows whose id is known.

    python benchmarks/new_ids.py --runs <run id> [<run id> ...] [--feature video_id]
        [--split test] [--tasks like click]

Each run is scored by torch on the whole split (calibrated probabilities, as evaluation and
the service see them). Per run and task: rows, positive rate, AUC, logloss and calibration
(mean probability / positive rate) on unseen and on seen ids. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from features.contract import OUTPUT, resolve_tracking_uri
from pipelines.checkpoints import load, locate
from pipelines.export.parity import torch_outputs
from ranker.metrics import auc, calibration, logloss


def slices(run: str, client: MlflowClient, feature: str | None, split: str) -> tuple:
    """(probabilities [N, T], labels [N, T], unseen mask [N], task names, feature)."""
    with tempfile.TemporaryDirectory() as work:
        module, data = load(locate(run, client, Path(work)), client, Path(work))
    frame = data.source.scan(split).collect(engine="streaming")
    batch = data.state.transform(frame)
    feature = feature or data.config.item_key
    column = list(module.inputs.cat_names).index(feature)
    probs = torch_outputs(module, data.state, frame)[OUTPUT]
    return probs, batch.labels, batch.cat[:, column] == 0, [t.name for t in module.tasks], feature


def rows_of(run: str, probs, labels, unseen, tasks, wanted) -> list[list[str]]:
    rows = []
    for t, task in enumerate(tasks):
        if wanted and task not in wanted:
            continue
        for name, mask in (("unseen", unseen), ("seen", ~unseen)):
            seen = mask & ~np.isnan(labels[:, t])
            p, y = probs[seen, t], labels[seen, t]
            both = y.size and y.min() != y.max()
            rows.append(
                [run[:8], task, name, f"{y.size:,}", f"{y.mean():.3f}",
                 f"{auc(p, y):.4f}" if both else "-", f"{logloss(p, y):.4f}",
                 f"{calibration(p, y):.3f}"]
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--feature", default=None, help="default: the item key")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--tasks", nargs="*", default=[])
    args = parser.parse_args()
    client = MlflowClient(resolve_tracking_uri(args.tracking_uri))
    table = []
    for run in args.runs:
        probs, labels, unseen, tasks, feature = slices(run, client, args.feature, args.split)
        print(
            f"{run}: {unseen.mean():.1%} of {args.split} rows have a {feature} unseen in training"
        )
        table += rows_of(run, probs, labels, unseen, tasks, set(args.tasks))
    headers = ["run", "task", "ids", "rows", "positive rate", "AUC", "logloss", "calibration"]
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    print("\n".join("| " + " | ".join(r) + " |" for r in table))


if __name__ == "__main__":
    main()
