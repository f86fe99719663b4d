"""A reply as a job the process owns (SPEC section 11): it runs the exchange to its end
and appends every event to the reply's log, whoever reads it, and whether anyone does.

The first event (id 1) names the reply, so a client that loses its connection knows what
to resume. A log that fails (Redis gone) costs the readers their events, never the reply:
the exchange still runs to its end and is saved and billed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from chatmeter.streaming.exchange import Exchange
from chatmeter.streaming.log import ReplyLog, ReplyRecord

log = logging.getLogger("chatmeter.jobs")


def first_event(exchange: Exchange) -> dict[str, Any]:
    return {
        "chunk": "",
        "done": False,
        "message_id": str(exchange.message_id),
        "user_message_id": str(exchange.user_message_id),
    }


def record_of(exchange: Exchange) -> ReplyRecord:
    """What another process needs to settle the reply if this one dies mid-reply."""
    chat_id, user_message_id, at = (
        exchange.chat_id,
        exchange.user_message_id,
        exchange.user_message_at,
    )
    if chat_id is None or user_message_id is None or at is None:
        raise ValueError("only a chat's reply has a record")
    reservation = exchange.reservation
    return ReplyRecord(
        reservation_id=reservation.reservation_id,
        user_id=exchange.user_id,
        chat_id=chat_id,
        message_id=exchange.message_id,
        user_message_id=user_message_id,
        user_message_at=at,
        model=exchange.model,
        plan=reservation.plan,
        history_turns=len(exchange.request.history),
        output_cap=exchange.request.max_output_tokens,
    )


async def begin_reply(exchange: Exchange, replies: ReplyLog) -> uuid.UUID:
    """Open the reply's log with its first event; returns the reply id to read. Only a
    chat's reply is resumable (an OpenAI-style exchange has no chat to resume from)."""
    if exchange.chat_id is None:
        raise ValueError("only a chat's reply has a log")
    record = record_of(exchange) if replies.keeps_records else None
    await replies.begin(exchange.message_id, exchange.chat_id, first_event(exchange), record)
    return exchange.message_id


async def run_reply(exchange: Exchange, replies: ReplyLog) -> None:
    """Generate the reply to its end, appending each event to the log."""
    reply_id = exchange.message_id
    logging_ok = True
    try:
        async for event in exchange.events():
            if logging_ok:
                try:
                    await replies.append(reply_id, event)
                except Exception:
                    logging_ok = False
                    log.exception("the log of reply %s failed; the reply goes on", reply_id)
    finally:
        if logging_ok:
            try:
                await replies.finish(reply_id)
            except Exception:
                log.exception("the log of reply %s could not be closed", reply_id)
