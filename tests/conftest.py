"""Shared fixtures: a tiny generated log (written once per session) and the real KuaiRand data."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.synth import generate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SYNTHETIC_CONFIG = CONFIGS / "data" / "synthetic.yaml"
KUAIRAND_CONFIG = CONFIGS / "data" / "kuairand.yaml"
KUAIRAND_DIR = ROOT.parent / "shared" / "data" / "kuairand"


@pytest.fixture(scope="session")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 days, 30k impressions, small row groups so a split spans several pieces."""
    out = tmp_path_factory.mktemp("tiny") / "log"
    return generate(
        out, rows=30_000, users=600, items=1_500, authors=200, seed=7, rows_per_group=1_000
    )
