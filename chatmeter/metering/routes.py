"""Usage endpoints: the caller's budget and ledger, and the admin's view and limits."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from chatmeter.auth.tokens import USER_ID_RULE, is_user_id
from chatmeter.chats.store import decode_cursor
from chatmeter.deps import AdminUser, CurrentUser, ServicesDep
from chatmeter.errors import ApiError
from chatmeter.jsonutil import BadBody, json_response, parse_model, read_json
from chatmeter.metering import accounts
from chatmeter.metering.counting import Source
from chatmeter.metering.plans import MAX_TOKEN_LIMIT
from chatmeter.openapi import errors, json_body

router = APIRouter(tags=["usage"])


class UsageOut(BaseModel):
    """A user's usage (SPEC sections 4 and 10). `token_limit` and `tokens_remaining`
    are null for a plan without a token limit; the period fields without a period."""

    model_config = ConfigDict(extra="forbid")
    user_id: str
    total_tokens_used: int = Field(ge=0)
    token_limit: int | None = Field(ge=0)
    reserved_tokens: int = Field(ge=0)
    tokens_remaining: int | None = Field(ge=0)
    plan: str
    period: str = Field(description='none, day, week, month or a fixed length like "6h"')
    period_start: datetime | None
    resets_at: datetime | None
    currency: str
    spend_micros: int = Field(ge=0, description="millionths of the currency")
    spend_limit_micros: int | None = Field(ge=0)
    requests_per_minute: int | None = Field(ge=1)
    concurrent_replies: int | None = Field(ge=1)


class UsageEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: uuid.UUID
    chat_id: uuid.UUID | None = Field(description="null for an exchange of /v1")
    message_id: uuid.UUID
    model: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    thinking_tokens: int = Field(ge=0)
    cached_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    source: Source
    cost_micros: int = Field(ge=0)
    created_at: datetime


class EventPage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[UsageEvent]
    next: str | None


class NewLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    token_limit: int = Field(ge=0, le=MAX_TOKEN_LIMIT)


@router.get("/api/usage", response_model=UsageOut, responses=errors())
async def my_usage(user: CurrentUser, services: ServicesDep) -> Response:
    row = await services.transactor.run(accounts.usage_steps, user.user_id, services.plans)
    return json_response(accounts.usage_json(row, services.plans))


@router.get("/api/usage/events", response_model=EventPage, responses=errors(400))
async def my_events(
    user: CurrentUser,
    services: ServicesDep,
    limit: int = Query(default=50, ge=1, le=500),
    before: str | None = Query(default=None, max_length=200),
) -> Response:
    cursor = decode_cursor(before) if before else None
    events, following = await services.transactor.run(
        accounts.list_events, user.user_id, limit, cursor
    )
    return json_response({"events": events, "next": following})


# an admin path's user id: any text but '/' (newlines included); one that holds '/' (the
# admin page sends it as %2F, which arrives decoded) is served by a second route, left
# out of the API description, because Starlette's `path` convertor (`.*`) takes no newline
ADMIN_USER = "/api/admin/users/{user_id}"
ADMIN_USER_WITH_SLASH = "/api/admin/users/{user_id:path}"


def user_id_of(raw: str) -> str:
    if not is_user_id(raw):
        raise ApiError(400, "INVALID_REQUEST", USER_ID_RULE)
    return raw


@router.put(ADMIN_USER_WITH_SLASH + "/limit", include_in_schema=False)
@router.put(
    ADMIN_USER + "/limit",
    response_model=UsageOut,
    responses=errors(400, 403),
    openapi_extra=json_body(NewLimit),
)
async def set_limit(
    user_id: str, request: Request, _: AdminUser, services: ServicesDep
) -> Response:
    user_id = user_id_of(user_id)
    try:
        body = parse_model(NewLimit, await read_json(request))
    except BadBody as exc:
        raise ApiError(400, "INVALID_REQUEST", exc.message) from None
    row = await services.transactor.run(
        accounts.set_limit, user_id, body.token_limit, services.plans
    )
    return json_response(accounts.usage_json(row, services.plans))


@router.get(ADMIN_USER_WITH_SLASH + "/usage", include_in_schema=False)
@router.get(ADMIN_USER + "/usage", response_model=UsageOut, responses=errors(400, 403))
async def user_usage(user_id: str, _: AdminUser, services: ServicesDep) -> Response:
    user_id = user_id_of(user_id)
    row = await services.transactor.run(accounts.usage_steps, user_id, services.plans)
    return json_response(accounts.usage_json(row, services.plans))
