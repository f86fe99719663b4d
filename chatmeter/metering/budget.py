"""Budgets that hold under concurrency (SPEC section 6).

Before a reply streams, one conditional UPDATE reserves the prompt's estimate plus the
output cap; it matches no row when the reservation would pass the limit, so two
concurrent requests can never both pass a check and then both spend. Settlement swaps
the reservation for the real figure in the same transaction that writes the ledger row.

Each reservation is also a row of `reservations`: one per chat (the 409 rule, across
workers), with a lease that the streaming process renews. A process that dies stops
renewing; `release_expired` hands its tokens back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from chatmeter.db.tables import reservations, user_usage, utcnow
from chatmeter.errors import ApiError
from chatmeter.metering.accounts import ensure_user

_REMAINING = (
    user_usage.c.token_limit - user_usage.c.total_tokens_used - user_usage.c.reserved_tokens
)


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: uuid.UUID
    user_id: str
    chat_id: uuid.UUID
    tokens: int
    prompt_estimate: int

    @property
    def output_cap(self) -> int:
        """The most output tokens the budget allows: what is sent to the provider."""
        return self.tokens - self.prompt_estimate


def budget_exceeded() -> ApiError:
    return ApiError(
        403, "TOKEN_BUDGET_EXCEEDED", "Your token budget is spent. Ask an admin to raise it."
    )


def reply_in_progress() -> ApiError:
    return ApiError(409, "REPLY_IN_PROGRESS", "A reply is already being generated in this chat.")


async def _take(conn: AsyncConnection, user_id: str, tokens: int) -> bool:
    """Atomically add `tokens` to the user's reservation if it fits under the limit."""
    result = await conn.execute(
        user_usage.update()
        .where(user_usage.c.user_id == user_id, _REMAINING >= tokens)
        .values(reserved_tokens=user_usage.c.reserved_tokens + tokens)
    )
    return result.rowcount == 1


async def _remaining(conn: AsyncConnection, user_id: str) -> int | None:
    query = sa.select(_REMAINING).where(user_usage.c.user_id == user_id)
    value = (await conn.execute(query)).scalar_one_or_none()
    return None if value is None else int(value)


async def reserve_budget(
    conn: AsyncConnection,
    *,
    user_id: str,
    chat_id: uuid.UUID,
    prompt_estimate: int,
    max_output_tokens: int,
    default_limit: int,
    worker_id: str,
    ttl_seconds: float,
) -> Reservation:
    """Reserve `prompt_estimate + max_output_tokens`, or as much output as the budget
    still allows (at least one token). Raises 403 TOKEN_BUDGET_EXCEEDED or 409
    REPLY_IN_PROGRESS. Runs inside the caller's write transaction."""
    granted = await _reserve_tokens(
        conn, user_id, prompt_estimate, prompt_estimate + max_output_tokens, default_limit
    )
    reservation = Reservation(uuid.uuid4(), user_id, chat_id, granted, prompt_estimate)
    if not await _claim_chat(conn, reservation, worker_id, ttl_seconds):
        raise reply_in_progress()
    return reservation


async def _reserve_tokens(
    conn: AsyncConnection, user_id: str, prompt_estimate: int, full: int, default_limit: int
) -> int:
    # the common case, a user far from the limit, costs one statement
    if await _take(conn, user_id, full):
        return full
    for _ in range(3):
        remaining = await _remaining(conn, user_id)
        if remaining is None:
            await ensure_user(conn, user_id, default_limit)
            if await _take(conn, user_id, full):
                return full
            continue
        wanted = min(full, remaining)
        if wanted < prompt_estimate + 1:
            raise budget_exceeded()
        # conditional again: another worker may have reserved since we looked
        if await _take(conn, user_id, wanted):
            return wanted
    raise budget_exceeded()


def _insert(conn: AsyncConnection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


async def _claim_chat(
    conn: AsyncConnection, reservation: Reservation, worker_id: str, ttl_seconds: float
) -> bool:
    now = utcnow()
    values = {
        "reservation_id": reservation.reservation_id,
        "user_id": reservation.user_id,
        "chat_id": reservation.chat_id,
        "tokens": reservation.tokens,
        "worker_id": worker_id,
        "stop_requested": False,
        "expires_at": now + timedelta(seconds=ttl_seconds),
        "created_at": now,
    }
    for _ in range(2):
        statement = (
            _insert(conn)(reservations)
            .values(values)
            .on_conflict_do_nothing(index_elements=["chat_id"])
        )
        if (await conn.execute(statement)).rowcount == 1:
            return True
        # the chat holds a reservation: a live reply (409), or one whose process died
        if not await _release(conn, reservations.c.chat_id == reservation.chat_id, expired=True):
            return False
    return False


async def _release(conn: AsyncConnection, condition: Any, *, expired: bool) -> int:
    """Delete matching reservations (only expired ones if `expired`) and hand their
    tokens back to their users. Returns how many were released."""
    if expired:
        condition = sa.and_(condition, reservations.c.expires_at < utcnow())
    released = (
        await conn.execute(
            reservations.delete()
            .where(condition)
            .returning(reservations.c.user_id, reservations.c.tokens)
        )
    ).all()
    for user_id, tokens in released:
        await conn.execute(
            user_usage.update()
            .where(user_usage.c.user_id == user_id)
            .values(reserved_tokens=user_usage.c.reserved_tokens - tokens)
        )
    return len(released)


async def release_expired(conn: AsyncConnection) -> int:
    """Hand back the reservations of processes that died mid-stream."""
    return await _release(conn, sa.true(), expired=True)


async def take_reservation(conn: AsyncConnection, reservation_id: uuid.UUID) -> int:
    """Delete the reservation row and return its tokens: 0 if it is already gone (its
    lease ran out and the sweeper released it), so settling never releases twice."""
    tokens = (
        await conn.execute(
            reservations.delete()
            .where(reservations.c.reservation_id == reservation_id)
            .returning(reservations.c.tokens)
        )
    ).scalar_one_or_none()
    return int(tokens or 0)


async def renew_lease(
    conn: AsyncConnection, reservation_id: uuid.UUID, ttl_seconds: float
) -> bool | None:
    """Extend the lease; returns the stop flag, or None if the reservation is gone."""
    row = (
        await conn.execute(
            reservations.update()
            .where(reservations.c.reservation_id == reservation_id)
            .values(expires_at=utcnow() + timedelta(seconds=ttl_seconds))
            .returning(reservations.c.stop_requested)
        )
    ).one_or_none()
    return None if row is None else bool(row.stop_requested)


async def request_stop(conn: AsyncConnection, chat_id: uuid.UUID) -> str | None:
    """Flag the live reply of `chat_id` to stop; returns the worker holding it."""
    row = (
        await conn.execute(
            reservations.update()
            .where(reservations.c.chat_id == chat_id, reservations.c.expires_at >= utcnow())
            .values(stop_requested=True)
            .returning(reservations.c.worker_id)
        )
    ).one_or_none()
    return None if row is None else str(row.worker_id)
