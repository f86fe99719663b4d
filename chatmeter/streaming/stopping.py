"""The transaction behind POST /api/chat/{chat_id}/stop (SPEC section 5)."""

from __future__ import annotations

import uuid
from datetime import datetime

from chatmeter.chats.store import owned_chat_steps
from chatmeter.db.steps import Steps
from chatmeter.metering.budget import request_stop


def flag_stop(chat_id: uuid.UUID, user_id: str, now: datetime) -> Steps[str | None]:
    """Check the chat is the user's (404/403), then flag its live reply to stop; returns
    the worker holding the reply, None if there is none. The flag is in the database
    because the reply may stream on another worker."""
    yield from owned_chat_steps(chat_id, user_id)
    return (yield from request_stop(chat_id, now))
