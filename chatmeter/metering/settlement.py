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
from datetime import datetime, timedelta

from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.db.transactor import Transactor
from chatmeter.ids import new_id
from chatmeter.metering.counting import Source
from chatmeter.metering.periods import to_micros
from chatmeter.metering.reservations import lock_user
from chatmeter.providers.base import Usage

log = logging.getLogger("chatmeter.metering")


@dataclass(frozen=True, slots=True)
class Settlement:
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


def settled_at(user_message_at: datetime | None) -> datetime:
    """When an exchange settles: now, but strictly after its user message, so the chat's
    history keeps its order."""
    now = utcnow()
    if user_message_at is None:
        return now
    return max(now, user_message_at + timedelta(microseconds=1))


def _in_period(column: str, amount: str) -> str:
    """`column` plus `amount` if the exchange settles in the row's period, the one that
    starts at `period_start`, or a later one (SPEC section 10): `column` stays the sum
    of the user's ledger rows since `period_start`. The settlement never moves the
    period: a later one is started by the next reservation (`budget.roll_over`), and
    the reads count it at once (`PlanBook.tokens_sql`), with this exchange in it. A
    settlement replayed late, from a period that ended before the row's, counts in
    none of the row's."""
    return f"{column} + (CASE WHEN CAST(:at AS BIGINT) >= period_start THEN {amount} ELSE 0 END)"


def settle_steps(
    s: Settlement, *, writable_ctes: bool = False, is_retry: bool = False
) -> Steps[None]:
    """The settlement, one transaction: on PostgreSQL (`writable_ctes`) one statement,
    one round trip; on SQLite a few statements in the writer's transaction. A retry first
    checks whether an earlier attempt committed after all.

    The exchange counts in the period in which it settles, at `created_at`, of the plan
    the user is on then: the ledger row is in it, and the totals are always the ledger's
    sums in the row's period (`_in_period`). So the settlement is the same under every
    plan: it needs no worker's plans."""
    if is_retry:
        # the user's row locked first: a settlement of the same message committing
        # meanwhile (another process replaying the same outbox) is then seen here
        yield from lock_user(s.user_id)
        table = "usage_events" if s.chat_id is None else "messages"
        done = yield Sql(f"SELECT 1 FROM {table} WHERE message_id = :id", {"id": s.message_id})
        if done:
            return
    params = _params(s)
    writes = _writes(s)
    if writable_ctes:
        # the lock order of `reservations.py` inside one statement: `locked` takes the user's
        # row before `gone` deletes the reservation (its one-time filter runs first);
        # the DELETE, not a read, says whether the reservation was still there, so a
        # sweeper that released it meanwhile is never released twice
        ctes = [
            "locked AS (SELECT 1 FROM user_usage WHERE user_id = :user_id FOR UPDATE)",
            "gone AS (DELETE FROM reservations WHERE reservation_id = :reservation_id "
            "AND EXISTS (SELECT 1 FROM locked) RETURNING tokens, micros)",
            *(f"w{i} AS ({write})" for i, write in enumerate(writes)),
        ]
        text = f"WITH {', '.join(ctes)} {_user_update('gone')}"
        yield Sql(text, params, alone=True, keyed_by="message_id")  # it returns no rows
        return
    # SQLite: one writer at a time, so the reservation read under the user's row update
    # is still there for the DELETE after it
    held = "(SELECT tokens, micros FROM reservations WHERE reservation_id = :reservation_id)"
    yield Sql(_user_update(held), params)
    yield Sql("DELETE FROM reservations WHERE reservation_id = :reservation_id", params)
    for write in writes:
        yield Sql(write, params)


def _user_update(held: str) -> str:
    """The user's row: the exchange added to the totals of its period (`_in_period`),
    the reservation `held` (a query of at most one row of tokens and micros) handed
    back."""
    total = _in_period("total_tokens_used", "CAST(:total AS BIGINT)")
    spend = _in_period("spend_micros", "CAST(:cost AS BIGINT)")
    return (
        f"UPDATE user_usage SET total_tokens_used = {total}, spend_micros = {spend}, "
        f"reserved_tokens = reserved_tokens - COALESCE((SELECT tokens FROM {held} AS h), 0), "
        f"reserved_micros = reserved_micros - COALESCE((SELECT micros FROM {held} AS h), 0), "
        f"active_replies = active_replies - (SELECT COUNT(*) FROM {held} AS h), "
        "updated_at = :now WHERE user_id = :user_id"
    )


def _writes(s: Settlement) -> list[str]:
    """The rows the exchange adds: its message (a chat's), its ledger row (if it used
    tokens), the chat's last activity."""
    writes = []
    if s.chat_id is not None:
        writes.append(
            "INSERT INTO messages (message_id, chat_id, role, content, tokens_consumed, status, "
            "prompt_tokens, completion_tokens, metering_source, finish_reason, created_at, "
            "cost_micros) VALUES (:message_id, :chat_id, 'assistant', :content, :total, "
            ":status, :prompt, :completion_all, :source, :finish_reason, :now, :cost)"
        )
    if s.usage.total_tokens:
        writes.append(
            "INSERT INTO usage_events (event_id, user_id, chat_id, message_id, model, "
            "prompt_tokens, completion_tokens, thinking_tokens, cached_tokens, total_tokens, "
            "source, created_at, cost_micros) VALUES (:event_id, :user_id, :chat_id, "
            ":message_id, :model, :prompt, :completion, :thinking, :cached, :total, :source, "
            ":now, :cost)"
        )
    if s.chat_id is not None:
        writes.append("UPDATE chats SET updated_at = :now WHERE chat_id = :chat_id")
    return writes


def _params(s: Settlement) -> dict[str, object]:
    usage = s.usage
    return {
        "user_id": s.user_id,
        "reservation_id": s.reservation_id,
        "message_id": s.message_id,
        "chat_id": s.chat_id,
        "event_id": new_id(),
        "model": s.model,
        "content": s.content,
        "status": s.status,
        "finish_reason": s.finish_reason,
        "source": s.source,
        "prompt": usage.prompt_tokens,
        "completion": usage.completion_tokens,
        "completion_all": usage.completion_tokens + usage.thinking_tokens,
        "thinking": usage.thinking_tokens,
        "cached": usage.cached_tokens,
        "total": usage.total_tokens,
        "cost": s.cost_micros,
        "at": to_micros(s.created_at),
        "now": s.created_at,
    }


async def settle(transactor: Transactor, s: Settlement, *, is_retry: bool = False) -> None:
    """Write the settlement once. Raises on database errors
    (the caller retries). A first attempt is sent with the others of the moment
    (`run_together`, in the lock order: by user); a retry first looks whether an earlier
    attempt was written, in a transaction of its own."""
    if is_retry:
        await transactor.run(settle_steps, s, writable_ctes=transactor.writable_ctes, is_retry=True)
        return
    await transactor.run_together(
        s.user_id, settle_steps, s, writable_ctes=transactor.writable_ctes
    )


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
