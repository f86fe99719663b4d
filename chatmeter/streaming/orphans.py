"""Replies whose process died mid-reply (`kill -9`, a lost host), settled from their log.

A reply's process renews its reservation's lease while it generates; one that dies stops
renewing, and after the lease a surviving process's sweeper (`replies.py`) finds the
reservation expired. Without Redis the reply died with its process: the sweeper releases
the reservation (`reservations.release_expired`) and nothing is billed. With Redis the reply's
log outlives the process, its first entry holding the reply's `ReplyRecord`; the sweeper
settles such a reply before releasing the rest:

    the log (no end event) -> the prompt from the database -> count the prompt and the
    logged text (the counting path of an interrupted reply the provider gave no usage
    for) -> one transaction: the user's row locked, the reservation taken, the message
    saved `interrupted` with the logged text, the ledger row, the totals (`settle_steps`)
    -> the end event appended to the log, so its readers see the reply end.

Billed once: the settlement is the reservation's deletion, and only the transaction that
finds the reservation under its user's row lock settles (another sweeper, on another
worker, that comes second finds it gone and writes nothing). A process that was only
stalled past its lease, not dead, finds its reply settled when it settles it itself: its
message id is taken (the settlement's idempotency key), so it writes nothing, and its
later events land after the end event its readers already saw.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from chatmeter.db.steps import Sql, Steps
from chatmeter.ids import as_uuid
from chatmeter.metering.cost import Prices, cost_micros
from chatmeter.metering.reservations import lock_user
from chatmeter.metering.settlement import Settlement, settle_steps, settled_at
from chatmeter.providers.base import ChatTurn, GenerationRequest
from chatmeter.streaming.events import end_event
from chatmeter.streaming.log import LeftReply, ReplyRecord
from chatmeter.streaming.opening import LATEST_MESSAGES

if TYPE_CHECKING:
    from chatmeter.config import Settings
    from chatmeter.db.transactor import Transactor
    from chatmeter.metering.counting import TokenCounter
    from chatmeter.observability.metrics import Metrics
    from chatmeter.providers.base import Provider
    from chatmeter.providers.registry import ProviderRegistry

log = logging.getLogger("chatmeter.orphans")

STATUS = "interrupted"


class LeftLogs(Protocol):
    """The logs that outlive their process (`RedisLog`)."""

    async def left_behind(self, chat_id: uuid.UUID) -> LeftReply | None:
        """The chat's latest reply, if its log has its record and no end event."""

    async def end_left(self, left: LeftReply, event: dict[str, Any]) -> None:
        """Append the end event of a reply settled without its process."""


def expired_chat_reservations(now: datetime) -> Steps[list[tuple[uuid.UUID, uuid.UUID]]]:
    """The reservations of chats whose lease ran out: `(reservation_id, chat_id)`."""
    rows = yield Sql(
        "SELECT reservation_id, chat_id FROM reservations "
        "WHERE expires_at < :now AND chat_id IS NOT NULL",
        {"now": now},
    )
    return [(as_uuid(row[0]), as_uuid(row[1])) for row in rows]


def chat_claim_expired(chat_id: uuid.UUID, now: datetime) -> Steps[bool]:
    """Whether the chat is held by a reservation whose lease ran out."""
    rows = yield Sql(
        "SELECT 1 FROM reservations WHERE chat_id = :chat_id AND expires_at < :now",
        {"chat_id": chat_id, "now": now},
    )
    return bool(rows)


def prompt_of(record: ReplyRecord, system_prompt: str) -> Steps[GenerationRequest | None]:
    """The request the reply was generated for, as its opening made it: the user message
    and the `history_turns` latest messages before it (`opening.LATEST_MESSAGES`, as the
    opening read them; the chat took no message since, its reservation held it).
    None if the user message is gone."""
    rows = yield Sql(
        f"SELECT message_id, role, content {LATEST_MESSAGES}",
        {"chat_id": record.chat_id, "count": record.history_turns + 1},
    )
    message = yield Sql(
        "SELECT content FROM messages WHERE message_id = :id", {"id": record.user_message_id}
    )
    if not message:
        return None
    before = [row for row in rows if as_uuid(row[0]) != record.user_message_id]
    turns = [ChatTurn(role, content) for _, role, content in reversed(before)]
    history = turns[len(turns) - record.history_turns :] if record.history_turns else []
    return GenerationRequest(system_prompt, tuple(history), str(message[0][0]), record.output_cap)


def settle_left_steps(s: Settlement, now: datetime, writable_ctes: bool) -> Steps[bool]:
    """Settle a reply left by a dead process, if its reservation is still there and
    expired; False if not (another sweeper settled it, or its process renewed the lease
    after all). The user's row is locked first (the lock order of `reservations.py`), and every
    transaction that deletes a reservation locks its user's row first: the reservation
    seen here is the one the settlement deletes, in this transaction, and no other
    transaction can take it meanwhile."""
    yield from lock_user(s.user_id)
    held = yield Sql(
        "SELECT 1 FROM reservations WHERE reservation_id = :id AND expires_at < :now",
        {"id": s.reservation_id, "now": now},
    )
    if not held:
        return False
    yield from settle_steps(s, writable_ctes=writable_ctes)
    return True


@dataclass(eq=False, slots=True)
class OrphanSettler:
    """The sweeper's part for replies that have a log: settle them from it."""

    transactor: Transactor
    logs: LeftLogs
    counter: TokenCounter
    providers: ProviderRegistry
    settings: Settings
    metrics: Metrics

    async def settle_expired(self, now: datetime) -> int:
        """Settle every expired reservation whose reply left a log; the caller then
        releases the rest. Returns how many were settled."""
        settled = 0
        for reservation_id, chat_id in await self.transactor.run(expired_chat_reservations, now):
            try:
                settled += await self.settle_one(reservation_id, chat_id, now)
            except Exception:
                # Redis or the database away: the reservation is released as without Redis
                log.exception("could not settle the reply of reservation %s", reservation_id)
        return settled

    async def settle_one(
        self, reservation_id: uuid.UUID, chat_id: uuid.UUID, now: datetime
    ) -> bool:
        left = await self.logs.left_behind(chat_id)
        if left is None or left.record.reservation_id != reservation_id:
            return False
        record = left.record
        model = self.settings.models.get(record.model)
        # a model taken out of the configuration since: estimated, at no price
        system_prompt = self.settings.system_prompt_for(record.model) if model else ""
        request = await self.transactor.run(prompt_of, record, system_prompt)
        if request is None:
            return False
        metered = await self.counter.meter(
            await self._provider(record.model), request, left.text, None
        )
        created_at = settled_at(record.user_message_at)
        settlement = Settlement(
            user_id=record.user_id,
            chat_id=record.chat_id,
            model=record.model,
            reservation_id=record.reservation_id,
            message_id=record.message_id,
            content=left.text,
            status=STATUS,
            finish_reason=STATUS,
            usage=metered.usage,
            source=metered.source,
            created_at=created_at,
            cost_micros=cost_micros(metered.usage, model.prices if model else Prices()),
        )
        settled = await self.transactor.run(
            settle_left_steps, settlement, now, self.transactor.writable_ctes
        )
        if not settled:
            return False
        self.metrics.count_settled(settlement)
        log.warning(
            "settled reply %s of a stopped process from its log (%d tokens)",
            record.message_id,
            metered.usage.total_tokens,
        )
        await self.logs.end_left(left, end_event(settlement, record.user_message_id))
        return True

    async def _provider(self, model: str) -> Provider | None:
        try:
            return await self.providers.get(model)
        except Exception:
            return None  # it cannot start here: the reply is estimated
