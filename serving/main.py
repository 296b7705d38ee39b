"""The scoring service: FastAPI over onnxruntime, with hot reload of a registry alias.

    ranker serve --model models:/ranker-synthetic@champion      # or --model path/model.onnx

``POST /v1/rank`` scores one user's candidates and returns them sorted by the fused score,
each with every task's probability. ``GET /healthz`` (alive), ``/readyz`` (a model is
loaded, and not draining), ``/metrics`` (Prometheus), ``/v1/model`` (what is loaded).
Overload is answered 503 and a passed deadline 504; SIGTERM drains, then exits 0. When the
model is a registry alias, a background thread polls it; a new version is loaded beside the
old one and swapped in by one reference (``serving.holder``), so requests never fail or wait
on a load. This package imports neither torch nor lightning.

Layout (FastAPI's project template): ``core/config.py`` the settings, ``core/metrics.py``
Prometheus, ``schemas.py`` the bodies, ``holder.py`` the loaded model, ``api/`` the routes,
their dependencies, middleware and admission control, ``drain.py`` the graceful shutdown,
``model.py`` the ONNX scorer, ``registry.py`` where a model comes from.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.api import middleware
from serving.api.admission import Admission
from serving.api.main import api_router
from serving.core.config import Settings
from serving.core.metrics import Metrics
from serving.drain import Drain
from serving.holder import Holder


def intra_op_threads(settings: Settings) -> int:
    """onnxruntime threads per worker: as set, else the cores shared out among the workers."""
    return settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)


def create_app(settings: Settings) -> FastAPI:
    """The app with its model loaded (errors in the model or tables raise ``ModelError`` here,
    at start-up)."""
    metrics = Metrics()
    holder = Holder(settings, metrics, intra_op_threads(settings))
    holder.install(holder.load())
    holder.start_polling()
    drain = Drain(settings.grace_seconds)
    admission = Admission(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything loaded so far (model, tables, libraries) lives as long as the process:
        # out of the collector's reach, a full collection does not pause requests scanning it.
        gc.collect()
        gc.freeze()
        drain.attach()
        yield
        holder.stop()
        admission.scoring.shutdown(wait=False)
        metrics.worker_exited()

    app = FastAPI(
        title="ranker", description="Multi-task ranking over ONNX", version="1", lifespan=lifespan
    )
    app.state.settings, app.state.metrics, app.state.holder = settings, metrics, holder
    app.state.admission, app.state.drain = admission, drain
    middleware.install(app, settings, metrics, admission, drain)
    app.include_router(api_router)
    return app


def worker_app() -> FastAPI:
    """The app of one worker process of ``--workers N``: its settings come from the
    ``RANKER_SERVE_*`` environment ``ranker serve`` set."""
    return create_app(Settings())
