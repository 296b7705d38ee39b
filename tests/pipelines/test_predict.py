"""`ranker predict`: a log scored to Parquet, row for row, by the exported graph or torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from pipelines.checkpoints import RunError, load, locate
from pipelines.commands import main
from pipelines.evaluate import score_split
from pipelines.export import export
from pipelines.predict import predict
from ranker.scoring import probabilities
from tests.conftest import SYNTHETIC_CONFIG, Runs

RSS = """
import re, sys
from pathlib import Path
import pipelines.predict as P

def rss() -> int:  # the process's resident memory now, KiB
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

written = P.output_frame
def sampled(*args, **kwargs):  # after each row group scored
    print(rss(), flush=True)
    return written(*args, **kwargs)
P.output_frame = sampled
P.predict(model=sys.argv[1], log_path=sys.argv[2], out=Path(sys.argv[3]),
          tracking_uri=sys.argv[4], log=False, quiet=True)
"""


@pytest.fixture(scope="module")
def scored(runs: Runs, tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "onnx"
    done = predict(
        model=runs.mmoe,
        log_path=str(tiny_log),
        out=out,
        tracking_uri=runs.uri,
        quiet=True,
        fusion={"click": 1.0, "like": 2.0},
    )
    assert done.rows == pl.scan_parquet(tiny_log).select(pl.len()).collect().item()
    return out


def test_one_row_out_per_row_in_equal_to_evaluate(scored: Path, runs: Runs, tiny_log: Path) -> None:
    out = pl.read_parquet(scored)
    log = pl.read_parquet(tiny_log, hive_partitioning=True)
    assert out.height == log.height
    assert out["user_id"].to_list() == log["user_id"].to_list()  # the log's order
    client = MlflowClient(runs.uri)
    with tempfile.TemporaryDirectory() as tmp:
        module, data = load(locate(runs.mmoe, client, Path(tmp)), client, Path(tmp))
    scored, _ = score_split(module, data, "test")
    logits, users = scored.outputs["logits"], scored.users
    expected = probabilities(logits, module.calibrator)
    test = out.filter(pl.col("date") > pl.lit("2024-01-13").str.to_date())
    tasks = [f"p_{t.name}" for t in module.tasks]
    got = test.select(tasks).to_numpy()
    assert got.shape == expected.shape and (test["user_id"].to_numpy() == users).all()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    fused = out["p_click"].to_numpy() + 2 * out["p_like"].to_numpy()
    np.testing.assert_allclose(out["score"].to_numpy(), fused, rtol=1e-6)
    runs_of = client.search_runs([client.get_experiment_by_name("ranker-predict").experiment_id])
    assert any(r.data.tags.get("model.run_id") == runs.mmoe for r in runs_of)


def test_torch_gives_the_graph_s_probabilities(
    scored: Path, runs: Runs, tiny_log: Path, tmp_path: Path
) -> None:
    predict(
        model=runs.mmoe,
        log_path=str(tiny_log),
        out=tmp_path / "torch",
        backend="torch",
        tracking_uri=runs.uri,
        log=False,
        quiet=True,
    )
    onnx, torch = pl.read_parquet(scored), pl.read_parquet(tmp_path / "torch")
    columns = [c for c in torch.columns if c.startswith("p_")]
    np.testing.assert_allclose(
        torch.select(columns).to_numpy(), onnx.select(columns).to_numpy(), atol=1e-5
    )


def test_memory_stays_flat_while_the_log_streams(
    runs: Runs, tiny_log: Path, tmp_path: Path
) -> None:
    """Resident memory of a subprocess scoring 8 copies of the log (240k rows), after each
    row group: from a quarter of the way on (the runtimes' arenas warmed up) it grows by less
    than 30 MB, where reading the rows whole would add them all."""
    log = tmp_path / "x8"
    for copy in range(8):
        for file in tiny_log.rglob("*.parquet"):
            target = log / file.relative_to(tiny_log).with_name(f"{copy}-{file.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, target)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", RSS, runs.mmoe, str(log), str(out), runs.uri],
        capture_output=True,
        text=True,
        check=True,
    )
    samples = [int(line) for line in done.stdout.split()]
    assert pl.scan_parquet(out).select(pl.len()).collect().item() == 8 * 30_000
    warm = samples[len(samples) // 4]
    assert max(samples[len(samples) // 4 :]) < warm + 30_000, (warm, max(samples))


def test_bad_input_is_named(
    runs: Runs, tiny_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(*words: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main(["predict", "--model", runs.mmoe, "--tracking_uri", runs.uri, *words])
        assert stop.value.code == 2
        return capsys.readouterr().err

    no_item = tmp_path / "no_item.parquet"
    pl.read_parquet(tiny_log, hive_partitioning=True).drop("item_category").write_parquet(no_item)
    err = error("--log_path", str(no_item), "--out", str(tmp_path / "a"))
    assert "column 'item_category'" in err and str(no_item) in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.parquet").write_bytes(b"not parquet")
    err = error("--log_path", str(broken), "--out", str(tmp_path / "b"))
    assert "x.parquet is not a Parquet file" in err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "part-00000.parquet").write_bytes(b"earlier")
    err = error("--log_path", str(tiny_log), "--out", str(tmp_path / "c"))
    assert "holds an earlier result; pass --overwrite" in err
    err = error("--log_path", str(tiny_log), "--out", str(tmp_path / "d"), "--fusion", "{clik: 1}")
    assert "--fusion: fusion weights name tasks the model lacks: ['clik']" in err


def test_a_registered_model_and_an_exported_file_score_the_same(
    scored: Path, runs: Runs, tiny_log: Path, tmp_path: Path
) -> None:
    """models:/<name>/<version> (the graph the service runs) and the .onnx file export wrote
    (read with --dataset) give the probabilities the run's own graph gave."""
    exported = export(
        run=runs.mmoe,
        name="predict-test",
        out=tmp_path / "model.onnx",
        parity=1_000,
        tracking_uri=runs.uri,
        quiet=True,
    )
    expected = pl.read_parquet(scored)
    columns = [c for c in expected.columns if c.startswith("p_")]
    for model, dataset in (
        (f"models:/predict-test/{exported.version}", None),
        (str(tmp_path / "model.onnx"), str(SYNTHETIC_CONFIG)),
    ):
        out = tmp_path / model.replace("/", "_").replace(":", "")
        predict(
            model=model,
            log_path=str(tiny_log),
            out=out,
            dataset=dataset,
            tracking_uri=runs.uri,
            quiet=True,
        )
        got = pl.read_parquet(out)
        np.testing.assert_allclose(
            got.select(columns).to_numpy(), expected.select(columns).to_numpy(), atol=1e-6
        )
    client = MlflowClient(runs.uri)
    experiment = client.get_experiment_by_name("ranker-predict").experiment_id
    tags = [r.data.tags for r in client.search_runs([experiment])]
    assert any(t.get("model.version") == exported.version for t in tags)
    with pytest.raises(RunError, match="pass --dataset to read the log"):
        predict(
            model=str(tmp_path / "model.onnx"),
            log_path=str(tiny_log),
            out=tmp_path / "x",
            tracking_uri=runs.uri,
            quiet=True,
        )
