"""Settlement: the end of every exchange, whatever ended it (SPEC sections 5 and 6).

One transaction saves the assistant message, writes the ledger row, adds to the user's
total and releases the reservation. The assistant message id is the idempotency key: a
retry after a lost commit acknowledgement finds the message and writes nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatmeter.db.engine import IMMEDIATE
from chatmeter.db.tables import chats, messages, usage_events, user_usage
from chatmeter.metering.budget import take_reservation
from chatmeter.metering.counting import Source
from chatmeter.providers.base import Usage

log = logging.getLogger("chatmeter.metering")


@dataclass(frozen=True, slots=True)
class Settlement:
    user_id: str
    chat_id: uuid.UUID
    model: str
    reservation_id: uuid.UUID
    message_id: uuid.UUID
    content: str
    status: str
    finish_reason: str | None
    usage: Usage
    source: Source
    created_at: datetime


async def _already_settled(conn: AsyncConnection, message_id: uuid.UUID) -> bool:
    query = sa.select(messages.c.message_id).where(messages.c.message_id == message_id)
    return (await conn.execute(query)).first() is not None


async def write_settlement(conn: AsyncConnection, s: Settlement) -> None:
    """The settlement's statements, in the caller's write transaction."""
    released = await take_reservation(conn, s.reservation_id)
    await conn.execute(
        messages.insert().values(
            message_id=s.message_id,
            chat_id=s.chat_id,
            role="assistant",
            content=s.content,
            tokens_consumed=s.usage.total_tokens,
            status=s.status,
            prompt_tokens=s.usage.prompt_tokens,
            completion_tokens=s.usage.completion_tokens + s.usage.thinking_tokens,
            metering_source=s.source,
            finish_reason=s.finish_reason,
            created_at=s.created_at,
        )
    )
    if s.usage.total_tokens:
        await conn.execute(
            usage_events.insert().values(
                event_id=uuid.uuid4(),
                user_id=s.user_id,
                chat_id=s.chat_id,
                message_id=s.message_id,
                model=s.model,
                prompt_tokens=s.usage.prompt_tokens,
                completion_tokens=s.usage.completion_tokens,
                thinking_tokens=s.usage.thinking_tokens,
                cached_tokens=s.usage.cached_tokens,
                total_tokens=s.usage.total_tokens,
                source=s.source,
                created_at=s.created_at,
            )
        )
    await conn.execute(
        user_usage.update()
        .where(user_usage.c.user_id == s.user_id)
        .values(
            total_tokens_used=user_usage.c.total_tokens_used + s.usage.total_tokens,
            reserved_tokens=user_usage.c.reserved_tokens - released,
            updated_at=s.created_at,
        )
    )
    await conn.execute(
        chats.update().where(chats.c.chat_id == s.chat_id).values(updated_at=s.created_at)
    )


async def settle(engine: AsyncEngine, s: Settlement, *, is_retry: bool = False) -> None:
    """Write the settlement once. Raises on database errors (the caller retries).
    A retry first checks whether an earlier attempt committed after all."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(**IMMEDIATE)
        async with conn.begin():
            if is_retry and await _already_settled(conn, s.message_id):
                return
            await write_settlement(conn, s)


async def settle_with_retries(engine: AsyncEngine, s: Settlement, *, within_seconds: float) -> None:
    """Settle, retrying with backoff for up to `within_seconds`; raises the last error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_seconds
    delay = 0.05
    attempt = 0
    while True:
        try:
            await settle(engine, s, is_retry=attempt > 0)
            return
        except Exception as exc:
            if loop.time() + delay > deadline:
                log.error("settlement of message %s failed: %s", s.message_id, exc)
                raise
            log.warning("settlement of message %s failed (%s); retrying", s.message_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            attempt += 1
