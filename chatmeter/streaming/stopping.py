"""Stopping a chat's reply (SPEC sections 5 and 11): `POST .../stop`, and a chat deleted
while its reply streams.

The flag is set in the database (the source of truth: the reply may stream on another
worker or host, which also polls for it), the reply is stopped at once if this process
holds it, and the stop is announced to the other processes (`signals.py`) so theirs ends
within milliseconds instead of at their next poll."""

from __future__ import annotations

import uuid
from datetime import datetime

from chatmeter.chats.store import deactivate_chat, owned_chat_steps
from chatmeter.db.steps import Steps
from chatmeter.db.tables import utcnow
from chatmeter.metering.reservations import request_stop
from chatmeter.services import Services


def flag_stop(chat_id: uuid.UUID, user_id: str, now: datetime) -> Steps[str | None]:
    """Check the chat is the user's (404/403), then flag its live reply to stop; returns
    the worker holding the reply, None if there is none."""
    yield from owned_chat_steps(chat_id, user_id)
    return (yield from request_stop(chat_id, now))


async def stop_chat_reply(services: Services, chat_id: uuid.UUID, user_id: str) -> bool:
    """Stop the reply streaming in the user's chat; False if none is."""
    holder = await services.transactor.run(flag_stop, chat_id, user_id, utcnow())
    return await _stop_held(services, chat_id, holder)


async def delete_chat_and_stop_reply(services: Services, chat_id: uuid.UUID, user_id: str) -> None:
    """Soft-delete the user's chat, then stop the reply streaming in it. Deleted first:
    a message opening meanwhile then either finds the chat deleted (404) or has its
    reservation in place for the stop to flag; stopping first left a reply opened in
    between streaming on in a deleted chat."""
    await services.transactor.run(
        deactivate_chat, chat_id, user_id, services.transactor.writable_ctes
    )
    holder = await services.transactor.run(request_stop, chat_id, utcnow())
    await _stop_held(services, chat_id, holder)


async def _stop_held(services: Services, chat_id: uuid.UUID, holder: str | None) -> bool:
    """Stop the flagged reply of `chat_id` held by worker `holder` (None: no reply)."""
    if holder is None:
        return False
    if not services.replies.stop_local(chat_id) and holder != services.worker_id:
        await services.stop_signals.publish(chat_id)
    return True
