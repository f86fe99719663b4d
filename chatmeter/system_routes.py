"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from chatmeter.chats.schemas import ErrorBody
from chatmeter.db.health import database_answers
from chatmeter.deps import ServicesDep
from chatmeter.errors import error_response
from chatmeter.jsonutil import json_response

router = APIRouter(tags=["system"])


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ok"]


class Ready(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ready"]


PROMETHEUS_TEXT = "text/plain; version=0.0.4"


# HEAD too, out of the API description: load balancers and uptime checks probe with it
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Health)
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": ErrorBody, "description": "The database cannot be reached."}},
)
async def readyz(services: ServicesDep) -> Response:
    try:
        # bounded: a database host that drops packets must not hang the load balancer
        async with asyncio.timeout(3):
            await services.transactor.run(database_answers)
    except Exception:
        return error_response(503, "DATABASE_UNAVAILABLE", "The database cannot be reached.")
    return json_response({"status": "ready"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(services: ServicesDep) -> Response:
    services.metrics.active_streams.set(len(services.replies))
    return Response(services.metrics.render(), media_type=PROMETHEUS_TEXT)
