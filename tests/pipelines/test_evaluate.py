"""`ranker evaluate` and `ranker compare` on real tiny runs in a real SQLite MLflow store."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import RunError
from pipelines.commands import main
from pipelines.evaluate import compare, evaluate
from tests.conftest import Runs, fit

TASKS = ("click", "effective_view", "long_view", "like", "comment", "forward", "follow", "collect")
RANKER = Path(sys.executable).parent / "ranker"
SECTIONS = ("anomalies", "metrics", "history", "reliability", "experts", "gates")


def images(html: str) -> list[str]:
    return re.findall(r'<img alt="[^"]+" src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', html)


def test_evaluate_a_run_writes_a_self_contained_report_and_logs_it(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    e = evaluate(run=runs.home, tracking_uri=runs.uri, out=out)

    html = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in html
    # reliability, zero share / scale, distributions, heatmap, gate usage: all embedded
    assert len(images(html)) == 5
    assert 'src="http' not in html and "<script" not in html
    for task in TASKS:
        assert task in html
    markdown = (out / "report.md").read_text()
    assert "## Per-task metrics" in markdown and "## Expert health" in markdown
    assert all(f"| {task} |" in markdown for task in TASKS)
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["run_id"] == runs.home and saved["split"] == "test"

    # The same numbers as Lightning's test of the best checkpoint at the end of `fit`.
    client = MlflowClient(runs.uri)
    run = client.get_run(runs.home)
    for task in [*TASKS, "mean"]:
        for metric in ("auc", "gauc", "logloss", "ece"):
            key = f"{metric}/{task}"
            assert e.metrics[key] == pytest.approx(run.data.metrics[f"test/{key}"], abs=1e-6)
            assert run.data.metrics[f"eval/test/{key}"] == pytest.approx(e.metrics[key])
    assert e.oracle is not None and e.oracle["auc/click"] > e.metrics["auc/click"]
    assert e.rows == run.data.metrics["data/rows/test"]
    logged = {f.path for f in client.list_artifacts(runs.home, "evaluation/test")}
    assert logged == {
        f"evaluation/test/{n}" for n in ("report.html", "report.md", "evaluation.json")
    }
    # HoME: every expert of both layers and every gate diagnosed; curves per task
    names = {r["name"] for r in e.health["experts"]}
    assert {"meta/shared/0", "task/task:follow/0"} <= names
    assert set(e.reliability) == set(TASKS)
    printed = capsys.readouterr().out
    assert "report:" in printed and str(out / "report.html") in printed
    # By history length: every row in one bucket, users with no history among them.
    assert e.history == "recent_clicks" and e.by_history is not None
    assert sum(m["rows"] for m in e.by_history.values()) == e.rows
    assert {"0", "20+"} <= set(e.by_history) and "auc/mean" in e.by_history["20+"]
    assert "## By history length (recent_clicks)" in markdown
    assert "by length of the history 'recent_clicks'" in printed


def test_evaluate_a_checkpoint_path_finds_its_run_and_data(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = next((runs.checkpoints).glob(f"*/{runs.mmoe}/checkpoints/*.ckpt"))
    monkeypatch.chdir(tmp_path)  # the dataset config was given relative to nothing here
    e = evaluate(run=str(checkpoint), split="val", tracking_uri=runs.uri, quiet=True)
    assert e.run_id == runs.mmoe and e.model == "MMoE" and e.split == "val"
    assert (tmp_path / "reports" / runs.mmoe / "val" / "report.html").exists()
    run = MlflowClient(runs.uri).get_run(runs.mmoe)
    assert e.metrics["auc/mean"] == pytest.approx(run.data.metrics["val/auc/mean"], abs=1e-6)
    # MMoE: one gate per task over the 3 shared experts, no own experts
    assert len(e.health["gates"]) == len(TASKS)
    assert all(t["own_mass"] is None for t in e.health["tasks"])


def test_the_cli_prints_the_table_and_where_the_report_is(runs: Runs, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(RANKER), "evaluate", "--run", runs.mmoe, "--tracking_uri", runs.uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "MMoE" in result.stdout and "best AUC" in result.stdout
    assert f"reports/{runs.mmoe}/test/report.html" in result.stdout
    assert f"logged to MLflow run {runs.mmoe}" in result.stdout


def test_compare_two_runs_side_by_side(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    evaluations = compare([runs.mmoe, runs.home], tracking_uri=runs.uri, out=out, quiet=True)
    mmoe, home = evaluations
    html = (out / "comparison.html").read_text()
    for name in (mmoe.name, home.name, "AUC", "GAUC", "logloss", "ECE", "Expert-health flags"):
        assert name in html
    assert len(images(html)) == 1
    markdown = (out / "comparison.md").read_text()
    delta = home.value("auc", "click") - mmoe.value("auc", "click")
    assert f"{delta:+.4f}" in markdown
    # both evaluations were logged to their runs and are reused, not recomputed
    again = compare([runs.mmoe, runs.home], tracking_uri=runs.uri, out=out, quiet=True)
    assert [e.created for e in again] == [e.created for e in evaluations]


def test_compare_refuses_runs_on_different_tasks(runs: Runs, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="different tasks"):
        compare([runs.mmoe, runs.two_tasks], tracking_uri=runs.uri, out=tmp_path, quiet=True)


def error_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_input_is_one_clear_error(
    runs: Runs, tiny_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = ("--tracking_uri", runs.uri)
    err = error_of(capsys, "evaluate", "--run", "0123456789abcdef", *uri)
    assert "no MLflow run '0123456789abcdef'" in err
    err = error_of(capsys, "evaluate", "--run", str(tmp_path / "missing.ckpt"), *uri)
    assert "no checkpoint file at" in err and "missing.ckpt" in err
    err = error_of(capsys, "evaluate", "--run", str(tmp_path), *uri)
    assert "is a directory" in err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    assert "not a readable checkpoint" in error_of(capsys, "evaluate", "--run", str(garbage), *uri)

    client = MlflowClient(runs.uri)
    empty = client.create_run(client.get_experiment_by_name("ranker").experiment_id).info.run_id
    err = error_of(capsys, "evaluate", "--run", empty, *uri)
    assert f"MLflow run '{empty}' has no checkpoint" in err

    err = error_of(capsys, "evaluate", "--run", runs.mmoe, "--split", "holdout", *uri)
    assert "holdout" in err
    # a log whose test days are missing
    partial = tmp_path / "partial"
    for day in sorted(tiny_log.iterdir())[:-1]:
        shutil.copytree(day, partial / day.name)
    err = error_of(capsys, "evaluate", "--run", runs.mmoe, "--log_path", str(partial), *uri)
    assert "the test split of" in err and "is empty" in err
    # a dataset with other tasks than the model predicts
    two = next(Path(runs.uri.removeprefix("sqlite:///")).parent.glob("two_tasks.yaml"))
    err = error_of(capsys, "evaluate", "--run", runs.mmoe, "--dataset", str(two), *uri)
    assert "was trained on tasks" in err and str(two) in err
    err = error_of(capsys, "compare", runs.mmoe, *uri)
    assert "at least two runs" in err


def test_aw_moe_with_top_k_routing_trains_and_reports_its_load(
    tiny_log: Path, tmp_path: Path
) -> None:
    """configs/model/aw_moe.yaml with DeepSeekMoE routing, through `ranker fit`: the
    contrastive and balance terms are logged, and the evaluation report shows each top-k
    gate's load and balance."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = fit(
        tiny_log,
        uri,
        tmp_path / "checkpoints",
        "aw_moe",
        "--model.network.init_args.routing",
        "{top_k: 2, balance: 0.01}",
        "--model.network.init_args.num_experts",
        "4",
    )
    metrics = MlflowClient(uri).get_run(run).data.metrics
    assert metrics["train/aux/contrastive_epoch"] > 0 and metrics["train/aux/balance_epoch"] > 0
    e = evaluate(run=run, tracking_uri=uri, out=tmp_path / "report", quiet=True)
    gates = [g for g in e.health["gates"] if g["name"].startswith("aw_moe/task:")]
    assert len(gates) == 8 and all(sum(g["load"]) == pytest.approx(2.0) for g in gates)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "balance (1 = even)" in report and "load min / max" in report
