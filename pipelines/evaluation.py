"""What an evaluation report shows, as plain data (``evaluation.json``): written by
``ranker evaluate``, read back by ``ranker compare`` and drawn by ``pipelines.render``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ranker.diagnostics import json_safe

EVALUATION_FILE = "evaluation.json"
RELIABILITY_BINS = 20
SAMPLE_ROWS = 2048  # rows of expert outputs kept for the distribution plots


@dataclass
class Evaluation:
    """Everything a report shows, as plain data (``evaluation.json``; ``compare`` reads it)."""

    label: str  # what the user named: a run id or a checkpoint path
    run_id: str | None
    checkpoint: str
    model: str
    params: int
    dataset: str
    log_path: str
    split: str
    rows: int
    tasks: list[str]
    groups: dict[str, str]
    metrics: dict[str, float]  # "<metric>/<task>", "<metric>/mean", positive_rate/, count/
    oracle: dict[str, float] | None  # the true probabilities' metrics (generated logs)
    reliability: dict[str, dict[str, list[float]]]  # task -> rows / pred / rate per bin
    health: dict[str, Any]  # ranker.diagnostics.HealthReport.to_dict()
    limits: dict[str, float]
    seconds: dict[str, float]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    history: str | None = None  # the sequence feature whose length buckets ``by_history``
    by_history: dict[str, dict[str, float]] | None = None  # bucket -> metrics of its rows
    uncalibrated: dict[str, float] | None = None  # metrics before the model's calibration
    # Uplift data: the arms (control first); Qini, AUUC, uplift at 10 / 30 % per task and arm
    # ("qini/<task>/<arm>", "qini/mean", ...); the true effects' (generated data); Qini curves.
    arms: list[str] | None = None
    uplift: dict[str, float] | None = None
    uplift_oracle: dict[str, float] | None = None
    qini_curves: dict[str, dict[str, dict[str, list[float]]]] | None = None

    @property
    def short_id(self) -> str:
        return self.run_id[:8] if self.run_id else Path(self.checkpoint).stem

    @property
    def name(self) -> str:
        """Short name for tables: model and run (or checkpoint file)."""
        return f"{self.model} ({self.short_id})"

    @property
    def flags(self) -> list[str]:
        return list(self.health.get("flags", []))

    def value(self, metric: str, task: str) -> float:
        v = self.metrics.get(f"{metric}/{task}")
        return math.nan if v is None else float(v)

    def to_json(self) -> str:
        return json.dumps(json_safe(asdict(self)), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        doc = json.loads(text)
        for key in ("metrics", "oracle", "uplift", "uplift_oracle"):
            if doc.get(key) is not None:
                doc[key] = {k: math.nan if v is None else v for k, v in doc[key].items()}
        return cls(**doc)
