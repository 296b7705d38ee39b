"""The online scoring service: FastAPI over onnxruntime, with hot reload of a registry alias.

    ranker serve --model models:/ranker-synthetic@champion      # or --model path/model.onnx

``POST /v1/rank`` scores one user's candidates and returns them sorted by the fused score,
each with every task's probability. ``GET /healthz`` (alive), ``/readyz`` (a model is
loaded), ``/metrics`` (Prometheus), ``/v1/model`` (what is loaded). When the model is a
registry alias, a background thread polls it; a new version is loaded beside the old one and
swapped in with one assignment, so requests never fail or wait on a load. This module imports
neither torch nor lightning.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.model import Fusion, ModelError, RequestError, Scorer
from serving.registry import load_scorer, resolve_version

log = logging.getLogger("ranker.serving")

# A feature value: an id, a category or a number; NaN / inf are refused by the schema.
FiniteValue = int | Annotated[float, Field(allow_inf_nan=False)] | str | None


class User(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int | str = Field(description="the user id, as logged")
    features: dict[str, FiniteValue] = Field(
        default_factory=dict, description="user features that override the user table"
    )
    history: dict[str, list[int | str]] = Field(
        default_factory=dict,
        description=(
            "behaviour sequences by feature name (GET /v1/model lists them: inputs with a "
            "length), each a list of ids, most recent last; it overrides the user table's "
            "history. Longer than the feature's length: only the most recent are kept. "
            "Unknown ids score through the unknown bucket."
        ),
    )


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int | str = Field(description="the item id, as logged")
    features: dict[str, FiniteValue] | None = Field(
        default=None, description="item features that override the item table"
    )


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: User
    context: dict[str, FiniteValue] = Field(default_factory=dict)
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1, description="return only the best k")


class Scored(BaseModel):
    id: int | str
    score: float
    probabilities: dict[str, float]


class RankResponse(BaseModel):
    model: dict[str, str]
    candidates: list[Scored]


@dataclass
class Settings:
    model: str  # a path to a .onnx file or models:/<name>@<alias> (or /<version>)
    user_table: Path | None = None
    item_table: Path | None = None
    fusion: Fusion = field(default_factory=Fusion)
    max_candidates: int = 1000
    max_body_bytes: int = 1_000_000
    poll_seconds: float = 10.0
    tracking_uri: str | None = None
    threads: int | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ranker_requests",
            "Requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ranker_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        )
        self.candidates = Histogram(
            "ranker_candidates",
            "Candidates per rank request",
            registry=self.registry,
            buckets=(1, 10, 50, 100, 200, 500, 1000, 2000),
        )
        self.model = Gauge(
            "ranker_model_info",
            "The model being served (1)",
            ["name", "version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "ranker_model_reloads", "Model reloads by result", ["result"], registry=self.registry
        )


class Holder:
    """The current scorer; replaced by one assignment (atomic), read once per request."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.scorer: Scorer | None = None
        self.weights: np.ndarray | None = None
        self._stop = threading.Event()

    def install(self, scorer: Scorer) -> None:
        weights = self.settings.fusion.vector(scorer.tasks)  # refuses unknown tasks first
        old = self.scorer
        self.scorer, self.weights = scorer, weights
        if old is not None:
            self.metrics.model.remove(old.name, old.version)
        self.metrics.model.labels(scorer.name, scorer.version).set(1)

    def poll(self) -> None:
        """Reload when the alias points at another version; keep serving on any failure."""
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                current = self.scorer
                version = resolve_version(self.settings.model, self.settings.tracking_uri)
                if current is not None and version == current.version:
                    continue
                scorer = load_scorer(self.settings, version)
                self.install(scorer)
                self.metrics.reloads.labels("ok").inc()
                log.warning("now serving %s version %s", scorer.name, scorer.version)
            except Exception:  # a bad new version must not take the service down
                self.metrics.reloads.labels("failed").inc()
                log.exception(
                    "reload of %s failed; still serving the previous version", self.settings.model
                )

    def stop(self) -> None:
        self._stop.set()


class BodyLimit:
    """A 413 for a body over ``limit`` bytes, declared (Content-Length) or streamed (chunked),
    before the app reads it all. It counts what it refuses in ``requests``; a request it cuts
    short is marked in its scope so the inner measurement does not count it twice."""

    def __init__(self, app: ASGIApp, limit: int, requests: Counter) -> None:
        self.app, self.limit, self.requests = app, limit, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not scope.get("ranker.refused"):
                await self._refuse(scope, receive, send)
                return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded(message: Message) -> None:
            if not scope.get("ranker.refused"):
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["ranker.refused"] = True
        self.requests.labels(scope["path"], "413").inc()
        await _error(413, ["body"], f"body over {self.limit} bytes")(scope, receive, send)


def _error(status: int, loc: list, message: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": message}]}, status_code=status)


def create_app(settings: Settings) -> FastAPI:
    """The app with its model loaded (errors in the model or tables raise here, at start-up)."""
    metrics = Metrics()
    holder = Holder(settings, metrics)
    holder.install(load_scorer(settings))
    poller = None
    if settings.model.startswith("models:/") and "@" in settings.model:
        poller = threading.Thread(target=holder.poll, name="model-reload", daemon=True)
        poller.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        holder.stop()

    app = FastAPI(
        title="ranker", description="Multi-task ranking over ONNX", version="1", lifespan=lifespan
    )
    app.state.holder = holder

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        endpoint = request.url.path
        response = await call_next(request)
        if not request.scope.get("ranker.refused"):  # BodyLimit counted it
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, requests=metrics.requests)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # Location, message and type only: echoing the input back could hold NaN, which JSON
        # cannot carry (and would turn a 422 into a 500).
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return _error(422, err.loc, err.message)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = holder.scorer is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        scorer = holder.scorer
        return {
            **scorer.describe(),
            "fusion": settings.fusion.kind,
            "weights": dict(zip(scorer.tasks, holder.weights.tolist(), strict=True)),
        }

    @app.post("/v1/rank", responses={200: {"model": RankResponse}})
    def rank(body: RankRequest) -> Response:
        n = len(body.candidates)
        if n > settings.max_candidates:
            raise RequestError(
                ["body", "candidates"], f"{n} candidates, at most {settings.max_candidates}"
            )
        scorer, weights = holder.scorer, holder.weights  # one model for the whole request
        metrics.candidates.observe(n)
        ids = [c.id for c in body.candidates]
        feeds = scorer.feeds(
            body.user.id,
            body.user.features,
            body.context,
            ids,
            [c.features for c in body.candidates],
            body.user.history,
        )
        probs = scorer.score(feeds)
        scores = settings.fusion(probs, weights)
        order = np.argsort(-scores, kind="stable")[: body.top_k]
        # Built as plain lists and dumped once: re-validating N response objects through
        # pydantic cost more than scoring them.
        tasks, rows, fused = scorer.tasks, probs[order].tolist(), scores[order].tolist()
        candidates = [
            {"id": ids[i], "score": s, "probabilities": dict(zip(tasks, p, strict=True))}
            for i, s, p in zip(order.tolist(), fused, rows, strict=True)
        ]
        content = {
            "model": {"name": scorer.name, "version": scorer.version},
            "candidates": candidates,
        }
        return Response(json.dumps(content), media_type="application/json")

    return app


__all__ = ["ModelError", "RankRequest", "Settings", "create_app"]
