"""A model with an extra named output (``two_heads.py``) goes through fit, export, predict and
the service without an edit outside its own file, config and test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from features.contract import OUTPUT
from pipelines.commands import main
from pipelines.export import export
from pipelines.predict import predict
from serving.model import Scorer
from tests.conftest import CONFIGS, SYNTHETIC_CONFIG

HERE = Path(__file__).parent
TASKS = 8


@pytest.fixture(scope="module")
def two_heads(tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("two_heads")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "trainer.yaml"),
            "--config",
            str(HERE / "two_heads.yaml"),
            "--data.dataset",
            str(SYNTHETIC_CONFIG),
            "--data.log_path",
            str(tiny_log),
            "--data.batch_size",
            "1024",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.tracking_uri",
            uri,
            "--trainer.logger.init_args.checkpoint_dir",
            str(root / "checkpoints"),
        ]
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ranker")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.tags["model"] == "TwoHeads" and "test/auc/mean" in run.data.metrics
    return run.info.run_id, uri


def test_every_named_output_is_exported_parity_checked_predicted_and_served(
    two_heads: tuple[str, str], tiny_log: Path, tmp_path: Path
) -> None:
    run_id, uri = two_heads
    exported = export(
        run=run_id, out=tmp_path / "model.onnx", register=False, tracking_uri=uri, quiet=True
    )
    names = ["probabilities", "second_probabilities", "norm"]
    assert list(exported.parity.outputs) == names and exported.parity.max_abs_diff <= 1e-5
    graph = onnx.load(str(exported.path))
    assert [o.name for o in graph.graph.output] == names

    scorer = Scorer(exported.path, "two", "local", "test")  # the service's loaded model
    assert scorer.outputs == names and scorer.describe()["outputs"] == names
    feeds = scorer.feeds(1, {}, {}, [1, 2, 3], [None] * 3)
    probs = scorer.score(feeds)
    assert probs.shape == (3, TASKS) and ((probs > 0) & (probs < 1)).all()

    tables = {}
    for backend in ("onnx", "torch"):
        out = tmp_path / backend
        predict(
            model=run_id,
            log_path=str(tiny_log),
            out=out,
            backend=backend,
            tracking_uri=uri,
            log=False,
            quiet=True,
        )
        tables[backend] = pl.read_parquet(out)
    onnx_table, torch_table = tables["onnx"], tables["torch"]
    second = [c for c in onnx_table.columns if c.startswith("second_probabilities_")]
    assert len(second) == TASKS and "norm" in onnx_table.columns
    assert len([c for c in onnx_table.columns if c.startswith("p_")]) == TASKS
    assert onnx_table.columns == torch_table.columns
    numbers = [c for c in onnx_table.columns if c.startswith(("p_", "second_")) or c == "norm"]
    np.testing.assert_allclose(
        onnx_table.select(numbers).to_numpy(), torch_table.select(numbers).to_numpy(), atol=1e-4
    )
    # the second head is not the first: a real output, not a copy
    assert not np.allclose(onnx_table[second[0]], onnx_table[f"p_{second[0].split('_', 2)[2]}"])
    assert names[0] == OUTPUT
