"""Every route of the service."""

from fastapi import APIRouter

from serving.api.routes import health, ranking, uplift

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(ranking.router)
api_router.include_router(uplift.router)
