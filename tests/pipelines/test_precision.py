"""Precision follows the hardware: the rule, the choice printed and tagged on the run, and a
bf16-mixed run that evaluation and export take as they take an fp32 one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.export import export
from pipelines.precision import BF16, FP32, Hardware, default_precision
from tests.conftest import Runs, fit


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        (Hardware("cuda", cuda_capability=(9, 0)), BF16),  # H100
        (Hardware("cuda", cuda_capability=(8, 0)), BF16),  # A100
        (Hardware("cuda", cuda_capability=(7, 5)), FP32),  # T4
        (Hardware("cpu", amx=True), BF16),  # Sapphire Rapids
        (Hardware("cpu", amx=False), FP32),  # AVX2 / AVX-512 without AMX
    ],
)
def test_bf16_where_the_hardware_has_it(hardware: Hardware, expected: str) -> None:
    precision, why = default_precision(hardware)
    assert precision == expected
    assert why  # said, not only chosen


def test_the_probe_names_the_device_training_runs_on() -> None:
    assert Hardware.probe("cpu").device == "cpu"
    assert Hardware.probe("auto").device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_run_without_precision_gets_the_hardwares_and_says_so(runs: Runs) -> None:
    run = MlflowClient(runs.uri).get_run(runs.mmoe)
    expected, why = default_precision(Hardware.probe("auto"))
    assert run.data.params["trainer.precision"] == expected
    assert run.data.tags["precision"] == f"{expected} ({why})"


@pytest.fixture(scope="module")
def bf16_run(tiny_log: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("bf16")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = fit(
        tiny_log, uri, root / "checkpoints", "mmoe",
        "--trainer.precision", BF16, "--model.network.init_args.num_experts", "3",
    )  # fmt: skip
    return uri, run_id


def test_an_explicit_precision_wins_and_is_tagged(bf16_run: tuple[str, str]) -> None:
    uri, run_id = bf16_run
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["trainer.precision"] == BF16
    assert run.data.tags["precision"] == f"{BF16} (set by --trainer.precision)"
    assert 0.5 < run.data.metrics["test/auc/mean"] < 1  # it learnt
    assert all(math.isfinite(v) for v in run.data.metrics.values())


def test_a_bf16_run_exports_like_an_fp32_one(bf16_run: tuple[str, str], tmp_path: Path) -> None:
    """Weights stay fp32 under bf16-mixed: the graph is fp32 and matches torch's fp32 forward
    at export's usual tolerance (1e-5)."""
    uri, run_id = bf16_run
    exported = export(
        run=run_id, out=tmp_path / "model.onnx", tracking_uri=uri, register=False, quiet=True
    )
    assert exported.parity.max_abs_diff <= 1e-5
