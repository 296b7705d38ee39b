"""The service's settings, defined once: ``ranker serve --help`` lists them, the command line
sets them, and so do ``RANKER_SERVE_<NAME>`` environment variables (how each worker process of
``--workers N`` receives them). The command line wins over the environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.contract import Fusion, FusionKind

ENV_PREFIX = "RANKER_SERVE_"
DEADLINE_HEADER = "X-Request-Timeout-Ms"  # the caller's budget, milliseconds


class Settings(BaseSettings):
    """``ranker serve``: the scoring service (FastAPI + onnxruntime)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        cli_prog_name="ranker serve",
        cli_implicit_flags=False,
        cli_hide_none_type=True,
    )

    model: str = Field(
        description="a .onnx file, models:/<name>@<alias> (followed as it moves) or "
        "models:/<name>/<version>"
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    workers: int = Field(
        1, ge=1, description="worker processes, each with its own model (share nothing)"
    )
    user_table: Path | None = Field(None, description="user feature snapshot (Parquet)")
    item_table: Path | None = Field(None, description="item feature snapshot (Parquet)")
    fusion: FusionKind = Field(
        "sum", description="how task probabilities combine: weighted sum or weighted product"
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description='task -> fusion weight: \'{"click": 1, "like": 4}\' or --weights click=1 '
        "--weights like=4; only the tasks named count (the others weigh 0), none named: every "
        "task weighs 1 (the rule of ranker predict --fusion too)",
    )
    max_candidates: int = Field(1000, ge=1, description="the most candidates one request holds")
    max_users: int = Field(1000, ge=1, description="the most users one uplift request holds")
    max_body_bytes: int = Field(1_000_000, ge=1, description="the largest request body")
    poll_seconds: float = Field(
        10.0, gt=0, description="how often a registry alias is checked for a new version"
    )
    threads: int | None = Field(
        None, ge=1, description="onnxruntime intra-op threads per worker (default: cores/workers)"
    )
    tracking_uri: str | None = Field(
        None, description="MLflow store of models:/ references (default: MLFLOW_TRACKING_URI)"
    )
    max_in_flight: int = Field(
        8,
        ge=1,
        description="rank requests a worker holds at once, scoring or waiting to; one more is "
        "answered 503 at once, with Retry-After (measured at 2 cores, 500 candidates: with "
        "Poisson arrivals at capacity almost none are shed, and at 4x the load the accepted "
        "requests' p99 stays within 1.3x of that at capacity; a longer queue only adds latency)",
    )
    scoring_concurrency: int = Field(
        1,
        ge=1,
        description="rank requests a worker scores at once (each with all its onnxruntime "
        "threads); the others wait their turn. 1 measured best: a second one competes for the "
        "interpreter with the event loop that answers the 503s",
    )
    scoring_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness of the scoring threads (the one that scores and onnxruntime's "
        "own, Linux): the event loop that admits, sheds and answers runs first when they "
        "compete for the cores; idle cores still go to scoring. 0: same priority",
    )
    deadline_ms: float = Field(
        1000.0,
        gt=0,
        description="the longest a rank request may wait to start scoring, from its arrival; "
        f"past it the answer is 504 at once, never a late score. A request's {DEADLINE_HEADER} "
        "header can lower it",
    )
    grace_seconds: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM: /readyz turns 503, new connections are refused, and requests "
        "in flight get this long to finish; then the process exits 0",
    )
    token: SecretStr | None = Field(
        None,
        description="a bearer token every /v1/* request must send (Authorization: Bearer "
        "<token>); none by default. Set it as RANKER_SERVE_TOKEN rather than on the command "
        "line, where other users of the machine can read it",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "warning", description="uvicorn's log level"
    )

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: dict[str, float]) -> dict[str, float]:
        Fusion(weights=weights)  # refuses NaN and infinite weights
        return weights

    @field_validator("token")
    @classmethod
    def _not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("an empty token would let anyone in; leave it unset for none")
        return token

    @property
    def fusion_rule(self) -> Fusion:
        return Fusion(self.fusion, self.weights)

    def environment(self) -> dict[str, str]:
        """These settings as ``RANKER_SERVE_*`` variables (a new process's ``Settings()``
        reads them back)."""
        values = self.model_dump(mode="json", exclude_none=True)
        if self.token is not None:  # json mode masks a secret; the worker needs it
            values["token"] = self.token.get_secret_value()
        return {
            f"{ENV_PREFIX}{key.upper()}": value if isinstance(value, str) else json.dumps(value)
            for key, value in values.items()
        }
