"""Chat and message queries. Every function takes the connection it runs on, so callers
decide the transaction."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatmeter.db.engine import IMMEDIATE
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import chats, messages, utcnow
from chatmeter.errors import ApiError
from chatmeter.ids import new_id

CHAT_COLUMNS = (
    chats.c.chat_id,
    chats.c.user_id,
    chats.c.title,
    chats.c.model,
    chats.c.is_active,
    chats.c.created_at,
    chats.c.updated_at,
)


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that reads and then writes. On SQLite it takes the write lock at
    BEGIN: a plain one fails at once with SQLITE_BUSY when another writer commits
    between its read and its write, and busy_timeout does not cover that."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(**IMMEDIATE)
        async with conn.begin():
            yield conn


def chat_json(chat: Mapping[Any, Any]) -> dict[str, Any]:
    """A chat as the API shows it, from a row's mapping or the values just inserted."""
    return {
        "chat_id": str(chat["chat_id"]),
        "title": chat["title"],
        "model": chat["model"],
        "is_active": bool(chat["is_active"]),
        "created_at": chat["created_at"].isoformat(),
        "updated_at": chat["updated_at"].isoformat(),
    }


def message_json(row: Any) -> dict[str, Any]:
    return {
        "message_id": str(row.message_id),
        "role": row.role,
        "content": row.content,
        "tokens_consumed": row.tokens_consumed,
        "status": row.status,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "metering_source": row.metering_source,
        "finish_reason": row.finish_reason,
        "cost_micros": row.cost_micros,
        "created_at": row.created_at.isoformat(),
    }


def parse_chat_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, "INVALID_CHAT_ID", "The chat id is not a valid UUID.") from None


async def insert_chat(
    conn: AsyncConnection, user_id: str, title: str, model: str
) -> dict[str, Any]:
    now = utcnow()
    row = {
        "chat_id": new_id(),
        "user_id": user_id,
        "title": title,
        "model": model,
        "is_active": True,
        "created_at": now,
        "updated_at": now,
    }
    await conn.execute(chats.insert().values(row))
    return row


async def owned_chat(conn: AsyncConnection, chat_id: uuid.UUID, user_id: str) -> Any:
    """The active chat `chat_id` of `user_id`: 404 if unknown or deleted, 403 if another
    user's (in that order, as the contract says)."""
    row = (
        await conn.execute(sa.select(*CHAT_COLUMNS).where(chats.c.chat_id == chat_id))
    ).one_or_none()
    return check_owned(row, user_id)


def check_owned(row: Any, user_id: str) -> Any:
    if row is None or not row.is_active:
        raise ApiError(404, "CHAT_NOT_FOUND", "This chat does not exist or was deleted.")
    if row.user_id != user_id:
        raise ApiError(403, "FORBIDDEN", "This chat belongs to someone else.")
    return row


@dataclass(frozen=True, slots=True)
class ChatRef:
    """What the message path needs of a chat."""

    user_id: str
    model: str
    is_active: bool


def owned_chat_steps(chat_id: uuid.UUID, user_id: str) -> Steps[ChatRef]:
    """`owned_chat` as a step of the message path's transactions (`db/steps.py`)."""
    rows = yield Sql(
        "SELECT user_id, model, is_active FROM chats WHERE chat_id = :chat_id",
        {"chat_id": chat_id},
    )
    chat = ChatRef(*rows[0]) if rows else None
    check_owned(chat, user_id)  # 404, then 403, as the contract orders them
    assert chat is not None
    return chat


def encode_cursor(moment: datetime, item_id: uuid.UUID) -> str:
    raw = f"{moment.isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        moment, item_id = base64.urlsafe_b64decode(padded).decode().split("|")
        return datetime.fromisoformat(moment), uuid.UUID(item_id)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "INVALID_REQUEST", "before: not a cursor from this API") from None


async def list_chats(
    conn: AsyncConnection, user_id: str, limit: int, before: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    query = (
        sa.select(*CHAT_COLUMNS)
        .where(chats.c.user_id == user_id, chats.c.is_active.is_(True))
        .order_by(chats.c.updated_at.desc(), chats.c.chat_id.desc())
        .limit(limit + 1)
    )
    if before:
        moment, chat_id = decode_cursor(before)
        query = query.where(
            sa.or_(
                chats.c.updated_at < moment,
                sa.and_(chats.c.updated_at == moment, chats.c.chat_id < chat_id),
            )
        )
    rows = (await conn.execute(query)).all()
    page = rows[:limit]
    following = encode_cursor(page[-1].updated_at, page[-1].chat_id) if len(rows) > limit else None
    return [chat_json(row._mapping) for row in page], following


async def chat_messages(conn: AsyncConnection, chat_id: uuid.UUID) -> Sequence[Any]:
    query = (
        sa.select(messages)
        .where(messages.c.chat_id == chat_id)
        .order_by(messages.c.created_at, messages.c.role.desc())
    )
    return (await conn.execute(query)).all()


async def rename_chat(conn: AsyncConnection, chat_id: uuid.UUID, title: str) -> None:
    await conn.execute(
        chats.update().where(chats.c.chat_id == chat_id).values(title=title, updated_at=utcnow())
    )


async def deactivate_chat(conn: AsyncConnection, chat_id: uuid.UUID) -> None:
    await conn.execute(
        chats.update()
        .where(chats.c.chat_id == chat_id)
        .values(is_active=False, updated_at=utcnow())
    )
