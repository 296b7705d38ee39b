"""``ranker fit`` on uplift data end to end: MTMT trains on generated customers, logs Qini,
AUUC and uplift at k per task and arm, selects its checkpoint on mean validation Qini; its
export returns every arm's probabilities and uplift against control, equal to torch's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from features.config import DatasetConfig
from features.datamodule import RankerDataModule
from features.synth_uplift import generate_uplift
from pipelines.commands import main
from pipelines.export import export
from pipelines.export.parity import graph_feeds
from tests.conftest import CONFIGS
from tests.features.test_treatment import write


def config_path(config: Path) -> Path:
    return DatasetConfig.from_yaml(config).path


@pytest.mark.parametrize("model", ["mtmt", "arm_heads", "mmoe"])  # mmoe: the S-learner
def test_an_uplift_model_fits_selects_on_qini_and_exports_every_arm(
    model: str, tmp_path: Path
) -> None:
    config = write(tmp_path, generate_uplift(rows=6000, treatments=3, seed=1))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main([
        "fit", "--config", str(CONFIGS / "trainer.yaml"),
        "--config", str(CONFIGS / "model" / f"{model}.yaml"),
        "--data.dataset", str(config), "--data.batch_size", "512",
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.tracking_uri", uri,
        "--trainer.logger.init_args.checkpoint_dir", str(tmp_path / "checkpoints"),
        "--model.network.init_args.expert_hidden", "[32, 16]",
    ])  # fmt: skip
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ranker").experiment_id])
    metrics, params = run.data.metrics, run.data.params
    assert params["selection/metric"] == "val/qini/mean"
    for stage in ("val", "test"):
        for task in ("visit", "buy"):
            for arm in ("arm1", "arm2"):
                for metric in ("qini", "auuc", "uplift_at_10", "uplift_at_30"):
                    assert math.isfinite(metrics[f"{stage}/{metric}/{task}/{arm}"])
    history = client.get_metric_history(run.info.run_id, "val/monitor")
    qini = client.get_metric_history(run.info.run_id, "val/qini/mean")
    assert [h.value for h in history] == pytest.approx([q.value for q in qini])
    exported = export(
        run=run.info.run_id, tracking_uri=uri, quiet=True, register=False,
        out=tmp_path / "export" / "model.onnx",
    )  # fmt: skip
    assert exported.parity.max_abs_diff <= 1e-5 and exported.parity.rows >= 1000
    effects = {"base_effect", "arm_effect"} if model == "mtmt" else set()
    assert set(exported.parity.outputs) == {
        "probabilities", "arm_probabilities", "uplift", *effects
    }  # fmt: skip
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    frame = pl.read_parquet(config_path(config)).head(64).drop("arm")  # the arm is not an input
    feeds = graph_feeds(RankerDataModule(str(config)), frame)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feeds), strict=True))
    assert out["arm_probabilities"].shape == (64, 3, 2)
    np.testing.assert_allclose(
        out["uplift"], out["arm_probabilities"][:, 1:] - out["arm_probabilities"][:, :1], atol=1e-6
    )
    np.testing.assert_allclose(out["probabilities"], out["arm_probabilities"][:, 0], atol=1e-6)
