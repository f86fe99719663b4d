"""Users' budget rows (`user_usage`) and their ledger (`usage_events`): reads and admin
changes. The reservation lives in `budget.py`, settlement in `settlement.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatmeter.chats.store import decode_cursor, encode_cursor, write_transaction
from chatmeter.db.tables import usage_events, user_usage, utcnow
from chatmeter.metering.plans import STANDING_COLUMNS, PlanBook, Standing


def usage_json(row: Any, book: PlanBook, now: datetime | None = None) -> dict[str, Any]:
    """A user's usage as the API shows it (SPEC sections 4 and 10), as of `now`: a
    period that ended shows as the new one, whether or not a statement rolled it yet."""
    standing = Standing.of(book, tuple(row._mapping[c] for c in _STANDING), now or utcnow())
    plan = standing.plan
    zone = book.zone
    current = standing.bounds
    return {
        "user_id": row.user_id,
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


_STANDING = [name.strip() for name in STANDING_COLUMNS.split(",")]


def _insert(conn: AsyncConnection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def _new_user(user_id: str, book: PlanBook) -> dict[str, Any]:
    """A user's first row: the default plan (`budget.ensure_user` on the message path)."""
    return {
        "user_id": user_id,
        "total_tokens_used": 0,
        "token_limit": book.plan(book.default).stored_token_limit,
        "reserved_tokens": 0,
        "updated_at": utcnow(),
        "plan": book.default,
        "token_limit_overridden": False,
    }


async def ensure_user(conn: AsyncConnection, user_id: str, book: PlanBook) -> None:
    """Create the user's budget row on the default plan if this is the first time the
    user is seen; never touches an existing row."""
    statement = (
        _insert(conn)(user_usage)
        .values(**_new_user(user_id, book))
        .on_conflict_do_nothing(index_elements=["user_id"])
    )
    await conn.execute(statement)


async def read_usage(conn: AsyncConnection, user_id: str, book: PlanBook) -> Any:
    query = sa.select(user_usage).where(user_usage.c.user_id == user_id)
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        await ensure_user(conn, user_id, book)
        row = (await conn.execute(query)).one()
    return row


async def usage_of(engine: AsyncEngine, user_id: str, book: PlanBook) -> Any:
    """The user's budget row, created on the default plan when first seen: a plain read
    when the row exists (almost always), a write transaction only to create it."""
    query = sa.select(user_usage).where(user_usage.c.user_id == user_id)
    async with engine.connect() as conn:
        row = (await conn.execute(query)).one_or_none()
    if row is not None:
        return row
    async with write_transaction(engine) as conn:
        return await read_usage(conn, user_id, book)


async def _upsert(
    conn: AsyncConnection, user_id: str, book: PlanBook, changes: dict[str, Any]
) -> Any:
    changes = {**changes, "updated_at": utcnow()}
    statement = (
        _insert(conn)(user_usage)
        .values(**{**_new_user(user_id, book), **changes})
        .on_conflict_do_update(index_elements=["user_id"], set_=changes)
    )
    await conn.execute(statement)
    return (await conn.execute(sa.select(user_usage).where(user_usage.c.user_id == user_id))).one()


async def set_limit(conn: AsyncConnection, user_id: str, limit: int, book: PlanBook) -> Any:
    """An admin's token limit for the user, over the plan's until a plan is assigned."""
    return await _upsert(
        conn, user_id, book, {"token_limit": limit, "token_limit_overridden": True}
    )


class UnknownPlan(ValueError):
    pass


async def set_plan(conn: AsyncConnection, user_id: str, plan: str, book: PlanBook) -> Any:
    """Put the user on `plan`; its token limit replaces an admin's override. With a
    period, the totals become the ledger's sums in the new plan's current period (so
    they stay equal to them); without one, they go on from where they are."""
    if plan not in book.plans:
        raise UnknownPlan(plan)
    chosen = book.plans[plan]
    row = await _upsert(
        conn,
        user_id,
        book,
        {"plan": plan, "token_limit": chosen.stored_token_limit, "token_limit_overridden": False},
    )
    current = book.bounds(chosen, utcnow())
    if current is None:
        return row
    since = sa.and_(usage_events.c.user_id == user_id, usage_events.c.created_at >= current.start)

    def ledger_sum(column: sa.Column[Any]) -> Any:
        return sa.select(sa.func.coalesce(sa.func.sum(column), 0)).where(since).scalar_subquery()

    await conn.execute(
        sa.update(user_usage)
        .where(user_usage.c.user_id == user_id)
        .values(
            period_start=current.start_micros,
            total_tokens_used=ledger_sum(usage_events.c.total_tokens),
            spend_micros=ledger_sum(usage_events.c.cost_micros),
        )
    )
    return (await conn.execute(sa.select(user_usage).where(user_usage.c.user_id == user_id))).one()


def event_json(row: Any) -> dict[str, Any]:
    return {
        "event_id": str(row.event_id),
        "chat_id": None if row.chat_id is None else str(row.chat_id),  # None: via /v1
        "message_id": str(row.message_id),
        "model": row.model,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "thinking_tokens": row.thinking_tokens,
        "cached_tokens": row.cached_tokens,
        "total_tokens": row.total_tokens,
        "source": row.source,
        "cost_micros": row.cost_micros,
        "created_at": row.created_at.isoformat(),
    }


async def list_events(
    conn: AsyncConnection, user_id: str, limit: int, before: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    query = (
        sa.select(usage_events)
        .where(usage_events.c.user_id == user_id)
        .order_by(usage_events.c.created_at.desc(), usage_events.c.event_id.desc())
        .limit(limit + 1)
    )
    if before:
        moment, event_id = decode_cursor(before)
        query = query.where(
            sa.or_(
                usage_events.c.created_at < moment,
                sa.and_(usage_events.c.created_at == moment, usage_events.c.event_id < event_id),
            )
        )
    rows = (await conn.execute(query)).all()
    page = rows[:limit]
    following = encode_cursor(page[-1].created_at, page[-1].event_id) if len(rows) > limit else None
    return [event_json(row) for row in page], following
