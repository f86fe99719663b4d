"""The rows of `reservations`: one per chat with a reply in flight (the 409 rule,
across workers; an exchange without a chat claims none), what it holds of the user's
budget, the lease its streaming process renews and the stop flag. A process that dies
stops renewing; `release_expired` hands back what its reservations held.

The functions are transaction steps (`chatmeter.db.steps`), composed into the
transactions of the message path (`budget.py`, `settlement.py`).

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
from chatmeter.ids import as_uuid


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: uuid.UUID
    user_id: str
    chat_id: uuid.UUID | None
    tokens: int
    prompt_estimate: int
    plan: str = "default"  # the user's plan when the reply opened (its period settles it)
    micros: int = 0  # the money held: the tokens at the model's highest price

    @property
    def output_cap(self) -> int:
        """The most output tokens the budget allows: what is sent to the provider."""
        return self.tokens - self.prompt_estimate


def claim_chat(
    reservation: Reservation,
    worker_id: str,
    ttl_seconds: float,
    now: datetime,
    release_expired: bool = True,
) -> Steps[bool]:
    """The chat's reservation row, with a lease of `ttl_seconds` for `worker_id`: False
    if the chat holds a live one (409). One whose lease ran out (its process died) is
    released first, unless `release_expired` is False."""
    values = {
        "reservation_id": reservation.reservation_id,
        "user_id": reservation.user_id,
        "chat_id": reservation.chat_id,
        "tokens": reservation.tokens,
        "micros": reservation.micros,
        "worker_id": worker_id,
        "no": False,
        "expires_at": now + timedelta(seconds=ttl_seconds),
        "now": now,
    }
    for _ in range(2):
        rows = yield Sql(
            "INSERT INTO reservations (reservation_id, user_id, chat_id, tokens, micros, "
            "worker_id, stop_requested, expires_at, created_at) VALUES (:reservation_id, "
            ":user_id, :chat_id, :tokens, :micros, :worker_id, :no, :expires_at, :now) "
            "ON CONFLICT (chat_id) DO NOTHING RETURNING reservation_id",
            values,
        )
        if rows or reservation.chat_id is None:  # null chat ids never conflict
            return True
        if not release_expired:
            return False
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
    """Delete the user's reservations that match and hand back what they held (tokens,
    money, a reply each). The caller holds the lock of the user's row."""
    rows = yield Sql(
        f"DELETE FROM reservations WHERE user_id = :user_id AND {condition} "
        "RETURNING tokens, micros",
        {**params, "user_id": user_id},
    )
    if rows:
        yield Sql(
            "UPDATE user_usage SET reserved_tokens = reserved_tokens - :tokens, "
            "reserved_micros = reserved_micros - CAST(:micros AS BIGINT), "
            "active_replies = active_replies - :replies WHERE user_id = :user_id",
            {
                "user_id": user_id,
                "tokens": sum(int(row[0]) for row in rows),
                "micros": sum(int(row[1]) for row in rows),
                "replies": len(rows),
            },
        )
    return len(rows)


def release_chat(user_id: str, chat_id: uuid.UUID, worker_id: str) -> Steps[int]:
    """Release the reservation `worker_id` holds on the user's chat (the caller holds
    the lock of the user's row)."""
    where = "chat_id = :chat_id AND worker_id = :worker_id"
    return (yield from _release(user_id, where, {"chat_id": chat_id, "worker_id": worker_id}))


def release_reservation(user_id: str, reservation_id: uuid.UUID) -> Steps[int]:
    """Release one of the user's reservations by its id, if it is still there (the caller
    holds the lock of the user's row)."""
    return (yield from _release(user_id, "reservation_id = :id", {"id": reservation_id}))


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


RENEW_BATCH = 100


def renew_leases(
    reservation_ids: list[uuid.UUID], expires_at: datetime, skip_locked: bool = False
) -> Steps[None]:
    """Extend the leases of the replies this process is streaming, 100 to a statement
    (padded, so the statement text, and the prepared statement, is always the same). A
    reservation whose exchange was lost without settling is not renewed, and expires.
    `skip_locked` (PostgreSQL): a reservation another transaction holds is left for the
    next renewal, a third of a lease later. It is being settled, most likely, and the
    settlements sent together lock several reservations in their own order: waiting for
    them could close a cycle (a deadlock)."""
    names = [f"r{i}" for i in range(RENEW_BATCH)]
    listed = f"reservation_id IN ({', '.join(':' + n for n in names)})"
    if skip_locked:
        listed = (
            f"reservation_id IN (SELECT reservation_id FROM reservations WHERE {listed} "
            "FOR UPDATE SKIP LOCKED)"
        )
    text = f"UPDATE reservations SET expires_at = :expires_at WHERE {listed}"
    for start in range(0, len(reservation_ids), RENEW_BATCH):
        batch = reservation_ids[start : start + RENEW_BATCH]
        batch += [batch[0]] * (RENEW_BATCH - len(batch))
        yield Sql(text, {"expires_at": expires_at, **dict(zip(names, batch, strict=True))})


@dataclass(frozen=True, slots=True)
class Held:
    """The live reply of a chat: the worker generating it and its reservation's id."""

    worker_id: str
    reservation_id: uuid.UUID


def request_stop(chat_id: uuid.UUID, now: datetime) -> Steps[Held | None]:
    """Flag the live reply of `chat_id` to stop; returns who holds it, None if no reply
    is live. The reply is stopped by its reservation's id, never by the chat's: a stop
    that reaches its worker late must not stop the chat's next reply."""
    rows = yield Sql(
        "UPDATE reservations SET stop_requested = :yes "
        "WHERE chat_id = :chat_id AND expires_at >= :now RETURNING worker_id, reservation_id",
        {"yes": True, "chat_id": chat_id, "now": now},
    )
    return Held(str(rows[0][0]), as_uuid(rows[0][1])) if rows else None


def flagged_stops(worker_id: str) -> Steps[list[uuid.UUID]]:
    """The reservations of the replies this worker holds and someone asked to stop."""
    rows = yield Sql(
        "SELECT reservation_id FROM reservations "
        "WHERE worker_id = :worker_id AND stop_requested = :yes",
        {"worker_id": worker_id, "yes": True},
    )
    return [as_uuid(row[0]) for row in rows]
