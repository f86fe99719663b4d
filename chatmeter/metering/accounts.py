"""Users' budget rows (`user_usage`) and their ledger (`usage_events`): reads and admin
changes. Reservation and settlement live in `budget.py`."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatmeter.chats.store import decode_cursor, encode_cursor, write_transaction
from chatmeter.db.tables import usage_events, user_usage, utcnow


def usage_json(row: Any) -> dict[str, Any]:
    remaining = row.token_limit - row.total_tokens_used - row.reserved_tokens
    return {
        "user_id": row.user_id,
        "total_tokens_used": row.total_tokens_used,
        "token_limit": row.token_limit,
        "reserved_tokens": row.reserved_tokens,
        "tokens_remaining": max(0, remaining),
    }


def _insert(conn: AsyncConnection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


async def ensure_user(conn: AsyncConnection, user_id: str, default_limit: int) -> None:
    """Create the user's budget row with the default limit if this is the first time
    the user is seen; never touches an existing row."""
    statement = (
        _insert(conn)(user_usage)
        .values(
            user_id=user_id,
            total_tokens_used=0,
            token_limit=default_limit,
            reserved_tokens=0,
            updated_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["user_id"])
    )
    await conn.execute(statement)


async def read_usage(conn: AsyncConnection, user_id: str, default_limit: int) -> Any:
    query = sa.select(user_usage).where(user_usage.c.user_id == user_id)
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        await ensure_user(conn, user_id, default_limit)
        row = (await conn.execute(query)).one()
    return row


async def usage_of(engine: AsyncEngine, user_id: str, default_limit: int) -> Any:
    """The user's budget row, created with the default limit when first seen: a plain
    read when the row exists (almost always), a write transaction only to create it."""
    query = sa.select(user_usage).where(user_usage.c.user_id == user_id)
    async with engine.connect() as conn:
        row = (await conn.execute(query)).one_or_none()
    if row is not None:
        return row
    async with write_transaction(engine) as conn:
        return await read_usage(conn, user_id, default_limit)


async def set_limit(conn: AsyncConnection, user_id: str, limit: int) -> Any:
    statement = (
        _insert(conn)(user_usage)
        .values(
            user_id=user_id,
            total_tokens_used=0,
            token_limit=limit,
            reserved_tokens=0,
            updated_at=utcnow(),
        )
        .on_conflict_do_update(
            index_elements=["user_id"], set_={"token_limit": limit, "updated_at": utcnow()}
        )
    )
    await conn.execute(statement)
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
