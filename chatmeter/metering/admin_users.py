"""GET /api/admin/users: every user with their plan, limits, usage and spend, searchable
and paged, for the admin console (issue 17)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from chatmeter.deps import AdminUser, ServicesDep
from chatmeter.errors import ApiError
from chatmeter.jsonutil import json_response
from chatmeter.metering import accounts
from chatmeter.metering.routes import UsageOut
from chatmeter.openapi import errors

router = APIRouter(tags=["usage"])


class UserPage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[UsageOut]
    total: int
    limit: int
    offset: int


@router.get("/api/admin/users", response_model=UserPage, responses=errors(400, 403))
async def list_users(
    _: AdminUser,
    services: ServicesDep,
    q: str = Query(default="", max_length=255, description="part of the user id, any case"),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0, le=2**31),
) -> Response:
    """Users known to chatmeter (seen at least once), ordered by id, as `GET /api/usage`
    shows each; `total` counts every match of `q`."""
    if "\x00" in q:
        # no user id holds a NUL (PostgreSQL text cannot): nothing to match, and asking
        # PostgreSQL would fail
        raise ApiError(400, "INVALID_REQUEST", "q: must not contain NUL characters")
    total, rows = await services.transactor.run(
        accounts.find_users, q, limit, offset, services.plans
    )
    users = [accounts.usage_json(row, services.plans) for row in rows]
    body = {"users": users, "total": total, "limit": limit, "offset": offset}
    return json_response(body)
