"""Plans, models and usage reports over HTTP (SPEC section 10)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from chatmeter.db.tables import utcnow
from chatmeter.deps import AdminUser, CurrentUser, ServicesDep
from chatmeter.errors import ApiError
from chatmeter.jsonutil import BadBody, json_response, parse_model, read_json
from chatmeter.metering import accounts
from chatmeter.metering.routes import ADMIN_USER, ADMIN_USER_WITH_SLASH, UsageOut, user_id_of
from chatmeter.metering.summary import SUM_FIELDS, DayRange, as_csv, group_by, summarize
from chatmeter.openapi import errors, json_body
from chatmeter.services import Services

router = APIRouter(tags=["plans"])


class Prices(BaseModel):
    """Per million tokens, in the currency."""

    input: float
    cached_input: float
    output: float
    thinking: float


class ModelOut(BaseModel):
    name: str
    provider: str
    context_window: int
    max_output_tokens: int
    default: bool
    prices: Prices


class ModelList(BaseModel):
    currency: str
    models: list[ModelOut]


class PlanOut(BaseModel):
    name: str
    default: bool
    token_limit: int | None
    spend_limit: float | None = Field(description="in the currency; exact in spend_limit_micros")
    spend_limit_micros: int | None
    period: str
    requests_per_minute: int | None
    concurrent_replies: int | None


class PlanList(BaseModel):
    currency: str
    plans: list[PlanOut]


class NewPlan(BaseModel):
    """A plan's name; null: back on the configured default, followed from then on."""

    model_config = ConfigDict(extra="forbid", strict=True)
    plan: str | None = Field(min_length=1, max_length=64)


class SummaryRow(BaseModel):
    day: str | None = None
    model: str | None = None
    user: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    thinking_tokens: int
    cached_tokens: int
    total_tokens: int
    cost_micros: int


class Summary(BaseModel):
    currency: str
    group_by: str
    from_: date = Field(alias="from")
    to: date
    rows: list[SummaryRow]


def _number(value: Decimal) -> float | int:
    """A price or limit for JSON: the shortest number that reads back as the Decimal
    (prices have few digits; the exact figures are the micro-unit integers)."""
    return int(value) if value == value.to_integral_value() else float(value)


@router.get("/api/models", response_model=ModelList, responses=errors())
async def list_models(_: CurrentUser, services: ServicesDep) -> Response:
    settings = services.settings
    models = []
    for name in sorted(settings.models):
        config = settings.models[name]
        prices = config.prices
        models.append(
            {
                "name": name,
                "provider": config.provider,
                "context_window": config.context_window,
                "max_output_tokens": config.max_output_tokens,
                "default": name == settings.default_model,
                "prices": {
                    "input": _number(prices.input),
                    "cached_input": _number(prices.cached_input),
                    "output": _number(prices.output),
                    "thinking": _number(prices.thinking),
                },
            }
        )
    return json_response({"currency": settings.currency, "models": models})


@router.get("/api/admin/plans", response_model=PlanList, responses=errors(403))
async def list_plans(_: AdminUser, services: ServicesDep) -> Response:
    settings = services.settings
    plans = []
    for name in sorted(settings.plans):
        config = settings.plans[name]
        plans.append(
            {
                **services.plans.plans[name].json(),
                "default": name == settings.default_plan,
                "spend_limit": None if config.spend_limit is None else _number(config.spend_limit),
            }
        )
    return json_response({"currency": settings.currency, "plans": plans})


@router.put(ADMIN_USER_WITH_SLASH + "/plan", include_in_schema=False)
@router.put(
    ADMIN_USER + "/plan",
    response_model=UsageOut,
    responses=errors(400, 403),
    openapi_extra=json_body(NewPlan),
)
async def set_plan(user_id: str, request: Request, _: AdminUser, services: ServicesDep) -> Response:
    user_id = user_id_of(user_id)
    try:
        body = parse_model(NewPlan, await read_json(request))
    except BadBody as exc:
        raise ApiError(400, "INVALID_REQUEST", exc.message) from None
    try:
        row = await services.transactor.run(accounts.set_plan, user_id, body.plan, services.plans)
    except accounts.UnknownPlan:
        known = ", ".join(sorted(services.plans.plans))
        raise ApiError(
            400, "UNKNOWN_PLAN", f"plan: {body.plan!r} is not a plan (plans: {known})"
        ) from None
    return json_response(accounts.usage_json(row, services.plans))


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise ApiError(400, "INVALID_REQUEST", "format: must be json or csv")
        return fmt == "csv"
    return _prefers_csv(request.headers.get("accept", ""))


_JSON_TYPES = frozenset({"application/json", "application/*", "*/*"})


def _prefers_csv(accept: str) -> bool:
    """Whether an Accept header asks for CSV: `text/csv` with a weight above 0 that no
    type JSON answers (`application/json`, `application/*`, `*/*`) passes."""
    csv_q = json_q = 0.0
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if not 0 <= q <= 1:  # NaN and weights out of range count as refusals
            q = 0.0
        media = media.lower()
        if media == "text/csv":
            csv_q = max(csv_q, q)
        elif media in _JSON_TYPES:
            json_q = max(json_q, q)
    return csv_q > 0 and csv_q >= json_q


async def _summary(
    services: Services,
    request: Request,
    raw: dict[str, str | None],
    allowed: tuple[str, ...],
    user_id: str | None,
) -> Response:
    zone = services.plans.zone
    by = group_by(raw["group_by"] or "day", allowed)
    days = DayRange.parse(raw["from"], raw["to"], utcnow().astimezone(zone).date())
    csv_wanted = _wants_csv(request, raw["format"])
    rows = await services.transactor.run(
        summarize, days, zone, by, user_id, services.settings.is_sqlite
    )
    if csv_wanted:
        return Response(
            as_csv(rows, by),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": (
                    f'attachment; filename="usage-{days.first}-{days.last}-by-{by}.csv"'
                )
            },
        )
    body: dict[str, Any] = {
        "currency": services.settings.currency,
        "group_by": by,
        "from": days.first.isoformat(),
        "to": days.last.isoformat(),
        "rows": rows,
    }
    return json_response(body)


_CSV_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/csv": {
                "schema": {
                    "type": "string",
                    "description": "A header row (the group, requests, "
                    + ", ".join(SUM_FIELDS)
                    + "), then one row per group.",
                }
            }
        }
    }
}


@router.get("/api/usage/summary", response_model=Summary, responses={**_CSV_DOC, **errors(400)})
async def my_summary(
    request: Request,
    user: CurrentUser,
    services: ServicesDep,
    from_: str | None = Query(default=None, alias="from", description="YYYY-MM-DD"),
    to: str | None = Query(default=None, description="YYYY-MM-DD, inclusive"),
    group_by: str | None = Query(default=None, description="day (default) or model"),
    format: str | None = Query(default=None, description="json (default) or csv"),
) -> Response:
    """The caller's usage by day (in the configured timezone) or by model."""
    raw = {"from": from_, "to": to, "group_by": group_by, "format": format}
    return await _summary(services, request, raw, ("day", "model"), user.user_id)


@router.get(
    "/api/admin/usage/summary",
    response_model=Summary,
    responses={**_CSV_DOC, **errors(400, 403)},
)
async def everyones_summary(
    request: Request,
    _: AdminUser,
    services: ServicesDep,
    from_: str | None = Query(default=None, alias="from", description="YYYY-MM-DD"),
    to: str | None = Query(default=None, description="YYYY-MM-DD, inclusive"),
    group_by: str | None = Query(default=None, description="day (default), model or user"),
    format: str | None = Query(default=None, description="json (default) or csv"),
) -> Response:
    """Everyone's usage by day, model or user; CSV with `format=csv` or
    `Accept: text/csv`."""
    raw = {"from": from_, "to": to, "group_by": group_by, "format": format}
    return await _summary(services, request, raw, ("day", "model", "user"), None)
