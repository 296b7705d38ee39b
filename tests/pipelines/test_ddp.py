"""Two DDP processes (gloo), two loader workers each: every validation row scored once, and
metrics (GAUC included, whose users span ranks) equal to one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.conftest import free_port

SCRIPT = Path(__file__).with_name("ddp_validate.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"


def run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_validation_scores_every_row_once_with_exact_metrics(
    tiny_log: Path, tmp_path: Path
) -> None:
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    run(sys.executable, str(SCRIPT), str(tiny_log), str(single), "0")
    run(
        str(TORCHRUN),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        str(tiny_log),
        str(ddp),
        "2",
    )
    one, two = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert one.keys() == two.keys()
    assert one["count/click"] == two["count/click"] > 1000  # each row once across 4 streams
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-12), key
