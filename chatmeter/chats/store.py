"""Chat and message queries, as transaction steps (`db/steps.py`): a route runs them with
`services.transactor.run(...)`, and the message path composes them with `yield from`."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from chatmeter.db.rows import as_datetime
from chatmeter.db.steps import Rows, Sql, Steps
from chatmeter.db.tables import utcnow
from chatmeter.errors import ApiError
from chatmeter.ids import as_uuid, new_id

Cursor = tuple[datetime, uuid.UUID]  # the moment and id of the last item of a page


@dataclass(frozen=True, slots=True)
class Chat:
    chat_id: uuid.UUID
    user_id: str
    title: str
    model: str
    is_active: bool
    created_at: datetime
    updated_at: datetime

    def json(self) -> dict[str, Any]:
        """The chat as the API shows it."""
        return {
            "chat_id": str(self.chat_id),
            "title": self.title,
            "model": self.model,
            "is_active": self.is_active,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


# the columns `read_chat` reads, in its order
CHAT_COLUMNS = "chat_id, user_id, title, model, is_active, created_at, updated_at"


def read_chat(row: tuple[Any, ...]) -> Chat:
    chat_id, user_id, title, model, is_active, created_at, updated_at = row
    return Chat(
        as_uuid(chat_id),
        str(user_id),
        str(title),
        str(model),
        bool(is_active),
        as_datetime(created_at),
        as_datetime(updated_at),
    )


# the columns `message_json` reads, in its order
MESSAGE_COLUMNS = (
    "message_id, role, content, tokens_consumed, status, prompt_tokens, completion_tokens, "
    "metering_source, finish_reason, cost_micros, created_at"
)


def message_json(row: tuple[Any, ...]) -> dict[str, Any]:
    (message_id, role, content, tokens, status, prompt, completion, source, finish, cost, at) = row
    return {
        "message_id": str(as_uuid(message_id)),
        "role": role,
        "content": content,
        "tokens_consumed": tokens,
        "status": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "metering_source": source,
        "finish_reason": finish,
        "cost_micros": cost,
        "created_at": as_datetime(at).isoformat(),
    }


def parse_chat_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "INVALID_CHAT_ID", "The chat id is not a valid UUID.") from None


def insert_chat(user_id: str, title: str, model: str) -> Steps[Chat]:
    now = utcnow()
    chat = Chat(new_id(), user_id, title, model, True, now, now)
    yield Sql(
        f"INSERT INTO chats ({CHAT_COLUMNS}) VALUES (:chat_id, :user_id, :title, :model, "
        ":yes, :now, :now)",
        {
            "chat_id": chat.chat_id,
            "user_id": user_id,
            "title": title,
            "model": model,
            "yes": True,
            "now": now,
        },
    )
    return chat


@dataclass(frozen=True, slots=True)
class ChatRef:
    """What the message path needs of a chat (its opening reads it with the history)."""

    user_id: str
    model: str
    is_active: bool


class Owned(Protocol):
    @property
    def user_id(self) -> str: ...
    @property
    def is_active(self) -> bool: ...


AnyChat = TypeVar("AnyChat", bound=Owned)


def check_owned(chat: AnyChat | None, user_id: str) -> AnyChat:
    """`chat` if it is the active chat of `user_id`: 404 if unknown or deleted, 403 if
    another user's (in that order, as the contract says)."""
    if chat is None or not chat.is_active:
        raise ApiError(404, "CHAT_NOT_FOUND", "This chat does not exist or was deleted.")
    if chat.user_id != user_id:
        raise ApiError(403, "FORBIDDEN", "This chat belongs to someone else.")
    return chat


def owned_chat_steps(chat_id: uuid.UUID, user_id: str) -> Steps[Chat]:
    """The active chat `chat_id` of `user_id` (`check_owned`)."""
    rows = yield Sql(
        f"SELECT {CHAT_COLUMNS} FROM chats WHERE chat_id = :chat_id",
        {"chat_id": chat_id},
        alone=True,
    )
    return check_owned(read_chat(rows[0]) if rows else None, user_id)


def encode_cursor(moment: datetime, item_id: uuid.UUID) -> str:
    raw = f"{moment.isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Cursor:
    """The moment (in UTC) and id a `before` cursor names. The client sent it: a moment
    without a zone, or one that is not a moment in UTC (0001-01-01T00:00+14:00 is in
    year 0), is not a cursor this API made."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw_moment, item_id = base64.urlsafe_b64decode(padded).decode().split("|")
        moment = datetime.fromisoformat(raw_moment)
        if moment.tzinfo is None:
            raise ValueError("a cursor's moment has a zone")
        return moment.astimezone(UTC), uuid.UUID(item_id)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise ApiError(400, "INVALID_REQUEST", "before: not a cursor from this API") from None


def page_before(
    select: str, moment: str, item_id: str, before: Cursor | None, limit: int
) -> tuple[str, dict[str, object]]:
    """`select` (ending in its WHERE conditions) newest first, a page of `limit` plus one
    (which says there is a next page), after the cursor `before`."""
    params: dict[str, object] = {"limit": limit + 1}
    if before is not None:
        select += (
            f" AND ({moment} < :before_moment "
            f"OR ({moment} = :before_moment AND {item_id} < :before_id))"
        )
        params |= {"before_moment": before[0], "before_id": before[1]}
    return f"{select} ORDER BY {moment} DESC, {item_id} DESC LIMIT :limit", params


def next_cursor(rows: Rows, limit: int, moment: datetime, item_id: uuid.UUID) -> str | None:
    """The cursor of the page after this one, if `rows` (`page_before`'s) hold one."""
    return encode_cursor(moment, item_id) if len(rows) > limit else None


def list_chats(
    user_id: str, limit: int, before: Cursor | None
) -> Steps[tuple[list[dict[str, Any]], str | None]]:
    """The user's active chats, last updated first."""
    text, params = page_before(
        f"SELECT {CHAT_COLUMNS} FROM chats WHERE user_id = :user_id AND is_active = :yes",
        "updated_at",
        "chat_id",
        before,
        limit,
    )
    rows = yield Sql(text, {**params, "user_id": user_id, "yes": True}, alone=True)
    page = [read_chat(row) for row in rows[:limit]]
    following = next_cursor(rows, limit, page[-1].updated_at, page[-1].chat_id) if page else None
    return [chat.json() for chat in page], following


def chat_with_messages(chat_id: uuid.UUID, user_id: str) -> Steps[dict[str, Any]]:
    """The user's chat and its messages, oldest first, as the API shows them."""
    chat = yield from owned_chat_steps(chat_id, user_id)
    rows = yield Sql(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = :chat_id "
        "ORDER BY created_at, role DESC, message_id DESC",  # the index's order
        {"chat_id": chat_id},
        alone=True,
    )
    return {**chat.json(), "messages": [message_json(row) for row in rows]}


def rename_chat(chat_id: uuid.UUID, user_id: str, title: str) -> Steps[Chat]:
    chat = yield from owned_chat_steps(chat_id, user_id)
    now = utcnow()
    yield Sql(
        "UPDATE chats SET title = :title, updated_at = :now WHERE chat_id = :chat_id",
        {"title": title, "now": now, "chat_id": chat_id},
    )
    return replace(chat, title=title, updated_at=now)


def deactivate_chat(chat_id: uuid.UUID, user_id: str, row_locks: bool = False) -> Steps[None]:
    """Soft-delete the user's chat. With `row_locks` (PostgreSQL) its row is locked FOR
    UPDATE first: an opening holds it FOR KEY SHARE while it reserves (`budget.py`), so
    the chat is deleted either before the opening looks (404) or after its reservation
    is there for the delete's stop to find."""
    yield from owned_chat_steps(chat_id, user_id)
    if row_locks:
        yield Sql(
            "SELECT chat_id FROM chats WHERE chat_id = :chat_id FOR UPDATE", {"chat_id": chat_id}
        )
    yield Sql(
        "UPDATE chats SET is_active = :no, updated_at = :now WHERE chat_id = :chat_id",
        {"no": False, "now": utcnow(), "chat_id": chat_id},
    )
