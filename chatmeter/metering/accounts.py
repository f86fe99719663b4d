"""Users' budget rows (`user_usage`) and their ledger (`usage_events`): reads and admin
changes, as transaction steps (`db/steps.py`). The reservation lives in `budget.py`, and
so does a user's first row (`ensure_user`); settlement in `settlement.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from chatmeter.chats.store import Cursor, next_cursor, page_before
from chatmeter.db.rows import as_datetime, as_optional_uuid
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.ids import as_uuid
from chatmeter.metering.budget import ensure_user
from chatmeter.metering.plans import UNASSIGNED, PlanBook, Standing

# a user's budget row as `usage_json` reads it: the user id, then `Standing`'s columns
UsageRow = tuple[Any, ...]


def _usage_columns(book: PlanBook) -> str:
    return f"user_id, {book.standing_columns}"


def usage_json(row: UsageRow, book: PlanBook, now: datetime | None = None) -> dict[str, Any]:
    """A user's usage as the API shows it (SPEC sections 4 and 10), as of `now`: a
    period that ended shows as the new one, whether or not a statement rolled it yet."""
    standing = Standing.of(book, row[1:], now or utcnow())
    plan = standing.plan
    zone = book.zone
    current = standing.bounds
    return {
        "user_id": row[0],
        "total_tokens_used": standing.total_tokens_used,
        "token_limit": standing.token_limit,
        "reserved_tokens": standing.reserved_tokens,
        "tokens_remaining": (
            None if standing.token_limit is None else max(0, standing.tokens_room)
        ),
        "plan": plan.name,
        "period": plan.period,
        "period_start": current.start.astimezone(zone).isoformat() if current else None,
        "resets_at": current.end.astimezone(zone).isoformat() if current else None,
        "currency": book.currency,
        "spend_micros": standing.spend_micros,
        "spend_limit_micros": plan.spend_limit_micros,
        "requests_per_minute": plan.requests_per_minute,
        "concurrent_replies": plan.concurrent_replies,
    }


def _read(user_id: str, book: PlanBook, now: datetime) -> Steps[UsageRow | None]:
    rows = yield Sql(
        f"SELECT {_usage_columns(book)} FROM user_usage WHERE user_id = :user_id",
        {"user_id": user_id, **book.standing_params(now)},
        alone=True,
    )
    return rows[0] if rows else None


def usage_steps(user_id: str, book: PlanBook, now: datetime | None = None) -> Steps[UsageRow]:
    """The user's budget row as of `now` (`Standing`), created on the default plan when
    first seen."""
    now = now or utcnow()
    row = yield from _read(user_id, book, now)
    if row is None:
        yield from ensure_user(user_id, book, now)
        row = yield from _read(user_id, book, now)
    assert row is not None
    return row


def set_limit(user_id: str, limit: int, book: PlanBook) -> Steps[UsageRow]:
    """An admin's token limit for the user, over the plan's until a plan is assigned."""
    now = utcnow()
    yield from ensure_user(user_id, book, now)
    yield Sql(
        "UPDATE user_usage SET token_limit = :limit, token_limit_overridden = :yes, "
        "updated_at = :now WHERE user_id = :user_id",
        {"limit": limit, "yes": True, "now": now, "user_id": user_id},
    )
    return (yield from usage_steps(user_id, book))


def find_users(
    part: str, limit: int, offset: int, book: PlanBook
) -> Steps[tuple[int, list[UsageRow]]]:
    """How many users' ids hold `part` (any case; every user when empty), and a page of
    their rows, ordered by id."""
    # `part` is matched as it is: LIKE's wildcards in it are escaped
    escaped = part.lower().replace("/", "//").replace("%", "/%").replace("_", "/_")
    where = "WHERE lower(user_id) LIKE :pattern ESCAPE '/'" if part else ""
    pattern = {"pattern": f"%{escaped}%"} if part else {}
    counted = yield Sql(f"SELECT COUNT(*) FROM user_usage {where}", pattern, alone=True, wide=True)
    rows = yield Sql(
        f"SELECT {_usage_columns(book)} FROM user_usage {where} ORDER BY user_id "
        "LIMIT :limit OFFSET :offset",
        {**pattern, "limit": limit, "offset": offset, **book.standing_params(utcnow())},
        alone=True,
        wide=True,
    )
    return int(counted[0][0]), rows


class UnknownPlan(ValueError):
    pass


def set_plan(
    user_id: str, plan: str | None, book: PlanBook, now: datetime | None = None
) -> Steps[UsageRow]:
    """Put the user on `plan`, or with None back on the configured default, followed
    from then on as by a user no admin assigned (`UNASSIGNED`); the plan's token limit
    replaces an admin's override. With a period, the totals become the ledger's sums in
    the new plan's current period (so they stay equal to them); without one, they go on
    from where they are: the sums in the old plan's current period, which start again
    from 0 if it ended even though no statement rolled the row over yet."""
    if plan is not None and plan not in book.plans:
        raise UnknownPlan(plan)
    chosen = book.plan(plan)
    stored = UNASSIGNED if plan is None else plan
    now = now or utcnow()
    yield from ensure_user(user_id, book, now)
    # the plan it leaves, read under the row's lock (a write) so no other change interleaves
    old = yield Sql(
        "UPDATE user_usage SET updated_at = :now WHERE user_id = :user_id RETURNING plan",
        {"now": now, "user_id": user_id},
    )
    yield Sql(
        "UPDATE user_usage SET plan = :plan, token_limit = :limit, "
        "token_limit_overridden = :no, updated_at = :now WHERE user_id = :user_id",
        {
            "plan": stored,
            "limit": chosen.stored_token_limit,
            "no": False,
            "now": now,
            "user_id": user_id,
        },
    )
    current = book.bounds(chosen, now) or book.bounds(book.plan(old[0][0]), now)
    if current is not None:
        since = "FROM usage_events WHERE user_id = :user_id AND created_at >= :start"
        yield Sql(
            "UPDATE user_usage SET period_start = CAST(:start_us AS BIGINT), "
            f"total_tokens_used = (SELECT COALESCE(SUM(total_tokens), 0) {since}), "
            f"spend_micros = (SELECT COALESCE(SUM(cost_micros), 0) {since}) "
            "WHERE user_id = :user_id",
            {"start_us": current.start_micros, "start": current.start, "user_id": user_id},
        )
    return (yield from usage_steps(user_id, book, now))


# the columns `event_json` reads, in its order
EVENT_COLUMNS = (
    "event_id, chat_id, message_id, model, prompt_tokens, completion_tokens, "
    "thinking_tokens, cached_tokens, total_tokens, source, cost_micros, created_at"
)


def event_json(row: tuple[Any, ...]) -> dict[str, Any]:
    (event_id, chat_id, message_id, model, prompt, completion, thinking, cached) = row[:8]
    total, source, cost, created_at = row[8:]
    chat = as_optional_uuid(chat_id)
    return {
        "event_id": str(as_uuid(event_id)),
        "chat_id": None if chat is None else str(chat),  # None: via /v1
        "message_id": str(as_uuid(message_id)),
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "thinking_tokens": thinking,
        "cached_tokens": cached,
        "total_tokens": total,
        "source": source,
        "cost_micros": cost,
        "created_at": as_datetime(created_at).isoformat(),
    }


def list_events(
    user_id: str, limit: int, before: Cursor | None
) -> Steps[tuple[list[dict[str, Any]], str | None]]:
    """The user's ledger, newest first."""
    text, params = page_before(
        f"SELECT {EVENT_COLUMNS} FROM usage_events WHERE user_id = :user_id",
        "created_at",
        "event_id",
        before,
        limit,
    )
    rows = yield Sql(text, {**params, "user_id": user_id}, alone=True)
    page = rows[:limit]
    following = None
    if page:
        last = page[-1]
        following = next_cursor(rows, limit, as_datetime(last[-1]), as_uuid(last[0]))
    return [event_json(row) for row in page], following
