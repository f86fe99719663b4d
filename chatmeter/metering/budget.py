"""Budgets that hold under concurrency (SPEC section 6).

Before a reply streams, one conditional UPDATE reserves the prompt's estimate plus the
output cap; it matches no row when the reservation would pass the limit, so two
concurrent requests can never both pass a check and then both spend. Settlement swaps
the reservation for the real figure in the same transaction that writes the ledger row.

Each reservation is also a row of `reservations`: one per chat (the 409 rule, across
workers; an exchange without a chat claims none), with a lease that the streaming
process renews. A process that dies stops renewing; `release_expired` hands its tokens
back.

The functions are transaction steps (`chatmeter.db.steps`): they yield SQL and are
composed with `yield from` into the transactions of the message path.

Lock order (PostgreSQL): a transaction that writes both tables locks the user's
`user_usage` row first, then the user's `reservations` rows; one that touches several
users takes them one at a time, sorted by user_id. Two transactions that took the same
rows in opposite orders deadlocked (an opening's INSERT waiting on a settlement's DELETE
of the chat's reservation, the settlement waiting on the opening's user row). SQLite has
one writer at a time and no such race; the same statements run on both.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from chatmeter.db.steps import Sql, Steps
from chatmeter.errors import ApiError
from chatmeter.ids import new_id
from chatmeter.values import Sendable

_REMAINING = "token_limit - total_tokens_used - reserved_tokens"


@dataclass(frozen=True, slots=True)
class Reservation(Sendable):
    reservation_id: uuid.UUID
    user_id: str
    chat_id: uuid.UUID | None
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


def as_uuid(value: object) -> uuid.UUID:
    """A uuid column as read back: native on PostgreSQL, 32 hex digits on SQLite."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def ensure_user(user_id: str, default_limit: int, now: datetime) -> Steps[None]:
    """Create the user's budget row with the default limit on first sight."""
    yield Sql(
        "INSERT INTO user_usage (user_id, total_tokens_used, token_limit, reserved_tokens, "
        "updated_at) VALUES (:user_id, 0, :limit, 0, :now) "
        "ON CONFLICT (user_id) DO NOTHING",
        {"user_id": user_id, "limit": default_limit, "now": now},
    )


def _take(user_id: str, tokens: int) -> Steps[bool]:
    """Atomically add `tokens` to the user's reservation if it fits under the limit."""
    rows = yield Sql(
        "UPDATE user_usage SET reserved_tokens = reserved_tokens + :tokens "
        f"WHERE user_id = :user_id AND {_REMAINING} >= :tokens RETURNING user_id",
        {"user_id": user_id, "tokens": tokens},
    )
    return bool(rows)


def _remaining(user_id: str) -> Steps[int | None]:
    rows = yield Sql(
        f"SELECT {_REMAINING} FROM user_usage WHERE user_id = :user_id", {"user_id": user_id}
    )
    return int(rows[0][0]) if rows else None


def reserve_budget(
    *,
    user_id: str,
    chat_id: uuid.UUID | None,
    prompt_estimate: int,
    max_output_tokens: int,
    default_limit: int,
    worker_id: str,
    ttl_seconds: float,
    now: datetime,
) -> Steps[Reservation]:
    """Reserve `prompt_estimate + max_output_tokens`, or as much output as the budget
    still allows (at least one token). Raises 403 TOKEN_BUDGET_EXCEEDED or 409
    REPLY_IN_PROGRESS, in that order (SPEC section 4)."""
    granted = yield from _reserve_tokens(
        user_id, prompt_estimate, prompt_estimate + max_output_tokens, default_limit, now
    )
    reservation = Reservation(new_id(), user_id, chat_id, granted, prompt_estimate)
    if not (yield from _claim_chat(reservation, worker_id, ttl_seconds, now)):
        raise reply_in_progress()
    return reservation


def _reserve_tokens(
    user_id: str, prompt_estimate: int, full: int, default_limit: int, now: datetime
) -> Steps[int]:
    # the common case, a user far from the limit, costs one statement
    if (yield from _take(user_id, full)):
        return full
    for _ in range(3):
        remaining = yield from _remaining(user_id)
        if remaining is None:
            yield from ensure_user(user_id, default_limit, now)
            if (yield from _take(user_id, full)):
                return full
            continue
        wanted = min(full, remaining)
        if wanted < prompt_estimate + 1:
            raise budget_exceeded()
        # conditional again: another worker may have reserved since we looked
        if (yield from _take(user_id, wanted)):
            return wanted
    raise budget_exceeded()


def _claim_chat(
    reservation: Reservation, worker_id: str, ttl_seconds: float, now: datetime
) -> Steps[bool]:
    values = {
        "reservation_id": reservation.reservation_id,
        "user_id": reservation.user_id,
        "chat_id": reservation.chat_id,
        "tokens": reservation.tokens,
        "worker_id": worker_id,
        "no": False,
        "expires_at": now + timedelta(seconds=ttl_seconds),
        "now": now,
    }
    for _ in range(2):
        rows = yield Sql(
            "INSERT INTO reservations (reservation_id, user_id, chat_id, tokens, worker_id, "
            "stop_requested, expires_at, created_at) VALUES (:reservation_id, :user_id, "
            ":chat_id, :tokens, :worker_id, :no, :expires_at, :now) "
            "ON CONFLICT (chat_id) DO NOTHING RETURNING reservation_id",
            values,
        )
        if rows or reservation.chat_id is None:  # null chat ids never conflict
            return True
        # the chat holds a reservation: a live reply (409), or one whose process died.
        # The chat is this user's, whose row `_take` has locked: the lock order holds.
        released = yield from _release(
            reservation.user_id,
            "chat_id = :chat_id AND expires_at < :now",
            {"chat_id": reservation.chat_id, "now": now},
        )
        if not released:
            return False
    return False


def lock_user(user_id: str) -> Steps[None]:
    """Lock the user's `user_usage` row (a write that changes nothing): the first lock of
    a transaction that goes on to lock the user's reservations (see the lock order)."""
    yield Sql(
        "UPDATE user_usage SET reserved_tokens = reserved_tokens WHERE user_id = :user_id",
        {"user_id": user_id},
    )


def _release(user_id: str, condition: str, params: dict[str, object]) -> Steps[int]:
    """Delete the user's reservations that match and hand their tokens back. The caller
    holds the lock of the user's row."""
    rows = yield Sql(
        f"DELETE FROM reservations WHERE user_id = :user_id AND {condition} RETURNING tokens",
        {**params, "user_id": user_id},
    )
    tokens = sum(int(row[0]) for row in rows)
    if tokens:
        yield Sql(
            "UPDATE user_usage SET reserved_tokens = reserved_tokens - :tokens "
            "WHERE user_id = :user_id",
            {"user_id": user_id, "tokens": tokens},
        )
    return len(rows)


def release_chat(user_id: str, chat_id: uuid.UUID, worker_id: str) -> Steps[int]:
    """Release the reservation `worker_id` holds on the user's chat (the caller holds
    the lock of the user's row)."""
    where = "chat_id = :chat_id AND worker_id = :worker_id"
    return (yield from _release(user_id, where, {"chat_id": chat_id, "worker_id": worker_id}))


def release_expired(now: datetime) -> Steps[int]:
    """Hand back the reservations of processes that died mid-stream: for each user who
    has one, sorted by user_id, lock the user's row, then delete and release."""
    rows = yield Sql(
        "SELECT DISTINCT user_id FROM reservations WHERE expires_at < :now", {"now": now}
    )
    released = 0
    for user_id in sorted(str(row[0]) for row in rows):
        yield from lock_user(user_id)
        released += yield from _release(user_id, "expires_at < :now", {"now": now})
    return released


def take_reservation(reservation_id: uuid.UUID) -> Steps[int]:
    """Delete the reservation row and return its tokens: 0 if it is already gone (its
    lease ran out and the sweeper released it), so settling never releases twice."""
    rows = yield Sql(
        "DELETE FROM reservations WHERE reservation_id = :id RETURNING tokens",
        {"id": reservation_id},
    )
    return int(rows[0][0]) if rows else 0


RENEW_BATCH = 100


def renew_leases(reservation_ids: list[uuid.UUID], expires_at: datetime) -> Steps[None]:
    """Extend the leases of the replies this process is streaming, 100 to a statement
    (padded, so the statement text, and the prepared statement, is always the same). A
    reservation whose exchange was lost without settling is not renewed, and expires."""
    names = [f"r{i}" for i in range(RENEW_BATCH)]
    text = (
        "UPDATE reservations SET expires_at = :expires_at "
        f"WHERE reservation_id IN ({', '.join(':' + n for n in names)})"
    )
    for start in range(0, len(reservation_ids), RENEW_BATCH):
        batch = reservation_ids[start : start + RENEW_BATCH]
        batch += [batch[0]] * (RENEW_BATCH - len(batch))
        yield Sql(text, {"expires_at": expires_at, **dict(zip(names, batch, strict=True))})


def request_stop(chat_id: uuid.UUID, now: datetime) -> Steps[str | None]:
    """Flag the live reply of `chat_id` to stop; returns the worker holding it."""
    rows = yield Sql(
        "UPDATE reservations SET stop_requested = :yes "
        "WHERE chat_id = :chat_id AND expires_at >= :now RETURNING worker_id",
        {"yes": True, "chat_id": chat_id, "now": now},
    )
    return str(rows[0][0]) if rows else None


def flagged_stops(worker_id: str) -> Steps[list[uuid.UUID]]:
    """The chats whose replies this worker holds and someone asked to stop."""
    rows = yield Sql(
        "SELECT chat_id FROM reservations WHERE worker_id = :worker_id AND stop_requested = :yes",
        {"worker_id": worker_id, "yes": True},
    )
    return [as_uuid(row[0]) for row in rows]
