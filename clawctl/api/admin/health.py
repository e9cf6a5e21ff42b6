"""clawd-native endpoints: health (with the resident models) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from clawctl.schemas.admin import Health
from clawctl.services import Services

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Health:
    services: Services = request.app.state.services
    return services.health()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    services.health()  # refreshes the loaded-models gauge
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
