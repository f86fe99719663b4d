"""Read the database the way an auditor would: totals, ledger, reservations, messages."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.tables import messages, reservations, usage_events, user_usage


@dataclass
class Books:
    total: int
    reserved: int
    limit: int
    ledger: int
    ledger_rows: int
    open_reservations: int


async def books(engine: AsyncEngine, user_id: str) -> Books:
    async with engine.connect() as conn:
        row = (
            await conn.execute(sa.select(user_usage).where(user_usage.c.user_id == user_id))
        ).one()
        ledger = (
            await conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(usage_events.c.total_tokens), 0),
                    sa.func.count(),
                ).where(usage_events.c.user_id == user_id)
            )
        ).one()
        open_reservations = (
            await conn.execute(sa.select(sa.func.count()).where(reservations.c.user_id == user_id))
        ).scalar_one()
    return Books(
        total=row.total_tokens_used,
        reserved=row.reserved_tokens,
        limit=row.token_limit,
        ledger=int(ledger[0]),
        ledger_rows=int(ledger[1]),
        open_reservations=int(open_reservations),
    )


async def open_reservations(engine: AsyncEngine, user_id: str) -> int:
    async with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(reservations.c.user_id == user_id)
        return int((await conn.execute(query)).scalar_one())


async def holds_a_reservation(engine: AsyncEngine, user_id: str) -> bool:
    """Whether a reply of the user is under way (for `eventually`)."""
    return await open_reservations(engine, user_id) > 0


async def chat_rows(engine: AsyncEngine, chat_id: str) -> list[Any]:
    async with engine.connect() as conn:
        query = (
            sa.select(messages)
            .where(messages.c.chat_id == uuid.UUID(chat_id))
            .order_by(messages.c.created_at)
        )
        return list((await conn.execute(query)).all())


async def ledger_row(engine: AsyncEngine, message_id: str) -> Any:
    async with engine.connect() as conn:
        query = sa.select(usage_events).where(usage_events.c.message_id == uuid.UUID(message_id))
        return (await conn.execute(query)).one_or_none()


@dataclass
class PeriodBooks:
    """A user's totals beside the sums of the ledger rows in the stored period."""

    total: int
    spend: int
    reserved: int
    reserved_micros: int
    active: int
    period_start: int
    ledger_total: int
    ledger_spend: int


async def period_books(engine: AsyncEngine, user_id: str) -> PeriodBooks:
    from chatmeter.metering.periods import from_micros

    async with engine.connect() as conn:
        row = (
            await conn.execute(sa.select(user_usage).where(user_usage.c.user_id == user_id))
        ).one()
        sums = (
            await conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(usage_events.c.total_tokens), 0),
                    sa.func.coalesce(sa.func.sum(usage_events.c.cost_micros), 0),
                ).where(
                    usage_events.c.user_id == user_id,
                    usage_events.c.created_at >= from_micros(row.period_start),
                )
            )
        ).one()
    return PeriodBooks(
        total=row.total_tokens_used,
        spend=row.spend_micros,
        reserved=row.reserved_tokens,
        reserved_micros=row.reserved_micros,
        active=row.active_replies,
        period_start=row.period_start,
        ledger_total=int(sums[0]),
        ledger_spend=int(sums[1]),
    )


def balanced(state: PeriodBooks) -> bool:
    """SPEC section 10: the totals are the ledger's sums in the current period."""
    return state.total == state.ledger_total and state.spend == state.ledger_spend
