"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from serving.api.deps import DrainDep, HolderDep, MetricsDep
from serving.core.metrics import MEDIA_TYPE

router = APIRouter()
# Liveness and readiness answer on the event loop (no thread hop): under load they stay as fast
# as a 503. The metrics may read the workers' files (--workers N): a thread.


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(holder: HolderDep, drain: DrainDep) -> JSONResponse:
    ready = holder.current is not None and not drain.started
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics")
def prometheus(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=MEDIA_TYPE)
