"""Every route of the service."""

from fastapi import APIRouter

from serving.api.routes import health, ranking

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(ranking.router)
