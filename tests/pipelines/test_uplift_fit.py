"""``ranker fit`` on uplift data end to end: MTMT trains on generated customers, logs Qini,
AUUC and uplift at k per task and arm, selects its checkpoint on mean validation Qini; its
export returns every arm's probabilities and uplift against control, equal to torch's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from features.config import DatasetConfig
from features.contract import META
from features.datamodule import RankerDataModule
from features.synth_uplift import true_probabilities
from pipelines.evaluate import evaluate
from pipelines.export import export
from pipelines.export.parity import graph_feeds
from pipelines.predict import predict
from ranker.uplift_metrics import uplift_metrics
from tests.conftest import UpliftRun, fit_uplift


def config_path(config: Path) -> Path:
    return DatasetConfig.from_yaml(config).path


@pytest.mark.parametrize("model", ["mtmt", "arm_heads", "mmoe"])  # mmoe: the S-learner
def test_an_uplift_model_fits_selects_on_qini_and_exports_every_arm(
    model: str, uplift_run: UpliftRun, tmp_path: Path
) -> None:
    if model == "mtmt":  # the shared run
        u = uplift_run
        uri, run_id, config, exported = u.uri, u.run_id, u.config, u.exported
    else:
        uri, run_id, config = fit_uplift(tmp_path, model)
        exported = export(
            run=run_id, tracking_uri=uri, quiet=True, register=False,
            out=tmp_path / "export" / "model.onnx",
        )  # fmt: skip
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    metrics, params = run.data.metrics, run.data.params
    assert params["selection/metric"] == "val/qini/mean"
    for stage in ("val", "test"):
        for task in ("visit", "buy"):
            for arm in ("arm1", "arm2"):
                for metric in ("qini", "auuc", "uplift_at_10", "uplift_at_30"):
                    assert math.isfinite(metrics[f"{stage}/{metric}/{task}/{arm}"])
    history = client.get_metric_history(run_id, "val/monitor")
    qini = client.get_metric_history(run_id, "val/qini/mean")
    assert [h.value for h in history] == pytest.approx([q.value for q in qini])
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
    arms = session.get_modelmeta().custom_metadata_map[META.ARMS]
    assert json.loads(arms) == ["control", "arm1", "arm2"]  # what the service names arms by
    np.testing.assert_allclose(
        out["uplift"], out["arm_probabilities"][:, 1:] - out["arm_probabilities"][:, :1], atol=1e-6
    )
    np.testing.assert_allclose(out["probabilities"], out["arm_probabilities"][:, 0], atol=1e-6)


@pytest.mark.parametrize("source", ["run", "onnx"])
def test_predict_writes_every_arm_and_its_uplift_for_customers_never_treated(
    source: str, uplift_run: UpliftRun, tmp_path: Path
) -> None:
    """New customers: no arm, no labels, no split; one column per arm and task."""
    logged = pl.read_parquet(config_path(uplift_run.config)).head(300)
    new = logged.select("customer", "region", "tier", "x0", "x1", "x2", "x3")
    new.write_parquet(tmp_path / "new.parquet")
    model = str(uplift_run.exported.path) if source == "onnx" else uplift_run.run_id
    predict(
        model=model, log_path=str(tmp_path / "new.parquet"), out=tmp_path / "out",
        dataset=str(uplift_run.config), tracking_uri=uplift_run.uri, log=False, quiet=True,
    )  # fmt: skip
    out = pl.read_parquet(tmp_path / "out")
    tasks, arms = ("visit", "buy"), ("control", "arm1", "arm2")
    assert out["customer"].to_list() == new["customer"].to_list()
    assert {f"p_{a}_{t}" for a in arms for t in tasks} <= set(out.columns)
    assert {f"uplift_{a}_{t}" for a in arms[1:] for t in tasks} <= set(out.columns)
    assert "uplift_control_visit" not in out.columns
    for task in tasks:
        np.testing.assert_allclose(out[f"p_{task}"], out[f"p_control_{task}"], atol=1e-6)
        for arm in arms[1:]:
            np.testing.assert_allclose(
                out[f"uplift_{arm}_{task}"],
                out[f"p_{arm}_{task}"] - out[f"p_control_{task}"],
                atol=1e-6,
            )


def test_evaluate_reports_qini_per_task_and_arm_with_curves_and_the_best_achievable(
    uplift_run: UpliftRun, tmp_path: Path
) -> None:
    e = evaluate(
        run=uplift_run.run_id, tracking_uri=uplift_run.uri, out=tmp_path / "report", quiet=True
    )
    assert e.arms == ["control", "arm1", "arm2"]
    # The same metrics from the exported graph's scores of the test customers (read afresh).
    test = pl.read_parquet(config_path(uplift_run.config)).filter(pl.col("split") == "test")
    session = ort.InferenceSession(
        str(uplift_run.exported.path), providers=["CPUExecutionProvider"]
    )
    feeds = graph_feeds(RankerDataModule(str(uplift_run.config)), test.drop("arm"))
    (graph,) = session.run(["arm_probabilities"], feeds)
    labels = test.select("visit", "buy").to_numpy().astype(np.float64)
    arm = test["arm"].replace_strict(e.arms, [0, 1, 2]).to_numpy()
    expected = uplift_metrics(graph, labels, arm, e.arms, ["visit", "buy"])
    for key, value in expected.items():  # near-ties of float32 scores order differently
        assert e.uplift[key] == pytest.approx(value, abs=0.03 if "_at_" in key else 2e-3), key
    # The true effects' Qini: the best achievable, above the 2-epoch model's; the model's
    # predicted effects against the true ones, row by row.
    assert e.uplift_oracle["qini/mean"] > max(e.uplift["qini/mean"], 0.02)
    truth = true_probabilities(test, e.arms, ["visit", "buy"])
    tau, true_tau = graph[:, 2, 1] - graph[:, 0, 1], truth[:, 2, 1] - truth[:, 0, 1]
    pehe = float(np.sqrt(np.mean((tau - true_tau) ** 2)))
    assert e.uplift["pehe/buy/arm2"] == pytest.approx(pehe, rel=1e-3)
    corr = np.corrcoef(tau, true_tau)[0, 1]
    assert e.uplift["effect_corr/buy/arm2"] == pytest.approx(corr, abs=1e-3)
    for task in ("visit", "buy"):
        for arm_name in ("arm1", "arm2"):
            curve = e.qini_curves[task][arm_name]
            assert len(curve["share"]) == len(curve["model"]) == 101
            assert curve["model"][0] == 0.0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Uplift against control" in html and 'alt="Qini curves"' in html
    assert "## Uplift against control" in (tmp_path / "report" / "report.md").read_text()
    logged = MlflowClient(uplift_run.uri).get_run(uplift_run.run_id).data.metrics
    assert logged["eval/test/qini/visit/arm1"] == pytest.approx(e.uplift["qini/visit/arm1"])
