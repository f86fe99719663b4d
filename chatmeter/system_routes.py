"""Liveness, readiness and metrics."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter
from starlette.responses import Response

from chatmeter.deps import ServicesDep
from chatmeter.errors import error_response
from chatmeter.jsonutil import json_response

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz")
async def readyz(services: ServicesDep) -> Response:
    try:
        async with services.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception:
        return error_response(503, "DATABASE_UNAVAILABLE", "The database cannot be reached.")
    return json_response({"status": "ready"})


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    services.metrics.active_streams.set(len(services.replies))
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")
