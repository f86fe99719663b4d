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
from chatmeter.metering.reservations import Held, request_stop
from chatmeter.services import Services


def flag_stop(chat_id: uuid.UUID, user_id: str, now: datetime) -> Steps[Held | None]:
    """Check the chat is the user's (404/403), then flag its live reply to stop; returns
    who holds the reply, None if there is none."""
    yield from owned_chat_steps(chat_id, user_id)
    return (yield from request_stop(chat_id, now))


async def stop_chat_reply(services: Services, chat_id: uuid.UUID, user_id: str) -> bool:
    """Stop the reply streaming in the user's chat; False if none is."""
    held = await services.transactor.run(flag_stop, chat_id, user_id, utcnow())
    return await _stop_held(services, held)


async def delete_chat_and_stop_reply(services: Services, chat_id: uuid.UUID, user_id: str) -> None:
    """Soft-delete the user's chat, then stop the reply streaming in it. Deleted first:
    a message opening meanwhile then either finds the chat deleted (404) or has its
    reservation in place for the stop to flag; stopping first left a reply opened in
    between streaming on in a deleted chat."""
    await services.transactor.run(
        deactivate_chat, chat_id, user_id, services.transactor.writable_ctes
    )
    held = await services.transactor.run(request_stop, chat_id, utcnow())
    await _stop_held(services, held)


async def _stop_held(services: Services, held: Held | None) -> bool:
    """Stop the flagged reply `held` (None: there was none), named by its reservation:
    a stop that comes late, after that reply ended, then stops nothing, not the next
    reply of the chat."""
    if held is None:
        return False
    reply = held.reservation_id
    if not services.replies.stop_local(reply) and held.worker_id != services.worker_id:
        await services.stop_signals.publish(reply)
    return True
