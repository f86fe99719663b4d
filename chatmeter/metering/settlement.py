"""Settlement: the end of every exchange, whatever ended it (SPEC sections 5 and 6).

One transaction saves the assistant message, writes the ledger row, adds to the user's
total and releases the reservation. The assistant message id is the idempotency key: a
retry after a lost commit acknowledgement finds the message and writes nothing twice.
An exchange without a chat (the OpenAI-compatible endpoint) saves no message: its
ledger row, unique by that id, is the key.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from chatmeter.db.steps import Sql, Steps
from chatmeter.db.transactor import Transactor
from chatmeter.ids import new_id
from chatmeter.metering.budget import lock_user, take_reservation
from chatmeter.metering.counting import Source
from chatmeter.metering.periods import to_micros
from chatmeter.providers.base import Usage
from chatmeter.values import Sendable

log = logging.getLogger("chatmeter.metering")


@dataclass(frozen=True, slots=True)
class Settlement(Sendable):
    user_id: str
    chat_id: uuid.UUID | None  # None: an exchange of /v1, which belongs to no chat
    model: str
    reservation_id: uuid.UUID
    message_id: uuid.UUID
    content: str
    status: str
    finish_reason: str | None
    usage: Usage
    source: Source
    created_at: datetime
    cost_micros: int = 0
    # the start (Unix microseconds) of the user's period at `created_at`; None when the
    # plan has no period. An exchange counts in the period in which it settles.
    period_start: int | None = None


_START = "CAST(:ps AS BIGINT)"
_ENDED = f"period_start < {_START}"
# the ledger row is in the period the row holds after this statement: always, unless
# it is a settlement replayed late, from a period that has ended since
_COUNTS = f"CAST(:at AS BIGINT) >= (CASE WHEN {_ENDED} THEN {_START} ELSE period_start END)"


def _in_period(column: str, amount: str) -> str:
    """`column` plus `amount`, in the period the exchange settles in: the stored period
    rolls over first if it ended (SPEC section 10), so that `column` stays the sum of
    the ledger rows since `period_start`."""
    return (
        f"(CASE WHEN {_ENDED} THEN 0 ELSE {column} END) "
        f"+ (CASE WHEN {_COUNTS} THEN {amount} ELSE 0 END)"
    )


def settle_steps(s: Settlement, *, is_retry: bool = False) -> Steps[bool]:
    """The settlement's statements, one transaction. A retry first checks whether an
    earlier attempt committed after all. Returns whether it took the reservation (False:
    it was gone already)."""
    if is_retry:
        # the user's row locked first: a settlement of the same message committing
        # meanwhile (another process replaying the same outbox) is then seen here
        yield from lock_user(s.user_id)
        table = "usage_events" if s.chat_id is None else "messages"
        done = yield Sql(f"SELECT 1 FROM {table} WHERE message_id = :id", {"id": s.message_id})
        if done:
            return False
    usage = s.usage
    # the user's row first, then the reservation (the lock order of `budget.py`)
    yield Sql(
        "UPDATE user_usage SET "
        f"total_tokens_used = {_in_period('total_tokens_used', 'CAST(:total AS BIGINT)')}, "
        f"spend_micros = {_in_period('spend_micros', 'CAST(:cost AS BIGINT)')}, "
        f"period_start = CASE WHEN {_ENDED} THEN {_START} ELSE period_start END, "
        "updated_at = :now WHERE user_id = :user_id",
        {
            "total": usage.total_tokens,
            "cost": s.cost_micros,
            "ps": s.period_start,
            "at": to_micros(s.created_at),
            "now": s.created_at,
            "user_id": s.user_id,
        },
    )
    released = yield from take_reservation(s.reservation_id)
    if s.chat_id is not None:
        yield Sql(
            "INSERT INTO messages (message_id, chat_id, role, content, tokens_consumed, status, "
            "prompt_tokens, completion_tokens, metering_source, finish_reason, created_at, "
            "cost_micros) VALUES (:message_id, :chat_id, 'assistant', :content, :total, "
            ":status, :prompt, :completion, :source, :finish_reason, :created_at, :cost)",
            {
                "message_id": s.message_id,
                "chat_id": s.chat_id,
                "content": s.content,
                "total": usage.total_tokens,
                "status": s.status,
                "prompt": usage.prompt_tokens,
                "completion": usage.completion_tokens + usage.thinking_tokens,
                "source": s.source,
                "finish_reason": s.finish_reason,
                "created_at": s.created_at,
                "cost": s.cost_micros,
            },
        )
    if usage.total_tokens:
        yield Sql(
            "INSERT INTO usage_events (event_id, user_id, chat_id, message_id, model, "
            "prompt_tokens, completion_tokens, thinking_tokens, cached_tokens, total_tokens, "
            "source, created_at, cost_micros) VALUES (:event_id, :user_id, :chat_id, "
            ":message_id, :model, :prompt, :completion, :thinking, :cached, :total, :source, "
            ":created_at, :cost)",
            {
                "event_id": new_id(),
                "user_id": s.user_id,
                "chat_id": s.chat_id,
                "message_id": s.message_id,
                "model": s.model,
                "prompt": usage.prompt_tokens,
                "completion": usage.completion_tokens,
                "thinking": usage.thinking_tokens,
                "cached": usage.cached_tokens,
                "total": usage.total_tokens,
                "source": s.source,
                "created_at": s.created_at,
                "cost": s.cost_micros,
            },
        )
    if released.replies:
        yield Sql(
            "UPDATE user_usage SET reserved_tokens = reserved_tokens - :released, "
            "reserved_micros = reserved_micros - CAST(:released_micros AS BIGINT), "
            "active_replies = active_replies - 1 WHERE user_id = :user_id",
            {
                "released": released.tokens,
                "released_micros": released.micros,
                "user_id": s.user_id,
            },
        )
    if s.chat_id is not None:
        yield Sql(
            "UPDATE chats SET updated_at = :now WHERE chat_id = :chat_id",
            {"now": s.created_at, "chat_id": s.chat_id},
        )
    return bool(released.replies)


async def settle(transactor: Transactor, s: Settlement, *, is_retry: bool = False) -> None:
    """Write the settlement once. Raises on database errors (the caller retries)."""
    await transactor.run(settle_steps, s, is_retry=is_retry)


async def settle_with_retries(
    transactor: Transactor, s: Settlement, *, within_seconds: float
) -> None:
    """Settle, retrying with backoff for up to `within_seconds`; raises the last error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_seconds
    delay = 0.05
    attempt = 0
    while True:
        try:
            await settle(transactor, s, is_retry=attempt > 0)
            return
        except Exception as exc:
            if loop.time() + delay > deadline:
                log.error("settlement of message %s failed: %s", s.message_id, exc)
                raise
            log.warning("settlement of message %s failed (%s); retrying", s.message_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            attempt += 1
