"""The chat steps (`chats/store.py`) through the transactor, on SQLite and PostgreSQL:
what they read back is what SQLAlchemy Core, with the tables' types, reads."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.chats import store
from chatmeter.db.tables import chats, messages, utcnow
from chatmeter.db.transactor import Transactor
from chatmeter.errors import ApiError
from chatmeter.ids import new_id


async def test_a_chat_reads_back_as_core_reads_it(
    transactor: Transactor, audit_engine: AsyncEngine
) -> None:
    made = await transactor.run(store.insert_chat, "ann", "Plans", "m")
    mine = await transactor.run(store.owned_chat_steps, made.chat_id, "ann")
    async with audit_engine.connect() as conn:
        row = (await conn.execute(sa.select(chats).where(chats.c.chat_id == made.chat_id))).one()
    core = store.Chat(
        row.chat_id,
        row.user_id,
        row.title,
        row.model,
        row.is_active,
        row.created_at,
        row.updated_at,
    )
    assert mine == made == core
    assert mine.json() == core.json()
    assert mine.created_at.tzinfo is not None and mine.created_at.utcoffset() == timedelta(0)


async def test_messages_read_back_as_core_reads_them(
    transactor: Transactor, audit_engine: AsyncEngine
) -> None:
    chat = await transactor.run(store.insert_chat, "bo", "t", "m")
    now = utcnow()
    written = [
        {"role": "user", "content": "hi", "tokens_consumed": 0, "status": "complete"},
        {
            "role": "assistant",
            "content": "hello",
            "tokens_consumed": 12,
            "status": "stopped",
            "prompt_tokens": 7,
            "completion_tokens": 5,
            "metering_source": "counted",
            "finish_reason": "stop",
            "cost_micros": 42,
        },
    ]
    async with audit_engine.begin() as conn:
        await conn.execute(
            messages.insert(),
            [
                {"message_id": new_id(), "chat_id": chat.chat_id, "created_at": now, **values}
                for values in written
            ],
        )
    shown = await transactor.run(store.chat_with_messages, chat.chat_id, "bo")
    async with audit_engine.connect() as conn:
        rows = (
            await conn.execute(sa.select(messages).where(messages.c.chat_id == chat.chat_id))
        ).all()
    by_role = {row.role: row for row in rows}
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]  # same moment
    for message in shown["messages"]:
        row = by_role[message["role"]]
        assert message == {
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
    assert {k: v for k, v in shown.items() if k != "messages"} == chat.json()


async def test_a_renamed_chat_is_what_a_fresh_read_finds(transactor: Transactor) -> None:
    chat = await transactor.run(store.insert_chat, "cy", "old", "m")
    renamed = await transactor.run(store.rename_chat, chat.chat_id, "cy", "new")
    assert renamed == await transactor.run(store.owned_chat_steps, chat.chat_id, "cy")
    assert renamed.title == "new" and renamed.updated_at > chat.updated_at


async def test_ownership_is_404_before_403(transactor: Transactor) -> None:
    chat = await transactor.run(store.insert_chat, "di", "t", "m")
    with pytest.raises(ApiError) as other:
        await transactor.run(store.owned_chat_steps, chat.chat_id, "eve")
    assert other.value.status == 403
    await transactor.run(store.deactivate_chat, chat.chat_id, "di")
    for who in ("di", "eve"):  # deleted: 404 for the owner and for anyone else
        with pytest.raises(ApiError) as gone:
            await transactor.run(store.owned_chat_steps, chat.chat_id, who)
        assert gone.value.status == 404
    with pytest.raises(ApiError) as unknown:
        await transactor.run(store.owned_chat_steps, new_id(), "di")
    assert unknown.value.status == 404


async def test_chats_page_newest_first_through_ties(transactor: Transactor) -> None:
    made = [await transactor.run(store.insert_chat, "fa", f"c{n}", "m") for n in range(5)]
    seen = []
    cursor = None
    while True:
        page, following = await transactor.run(store.list_chats, "fa", 2, cursor)
        seen += [chat["chat_id"] for chat in page]
        if following is None:
            break
        cursor = store.decode_cursor(following)
    newest_first = sorted(made, key=lambda c: (c.updated_at, c.chat_id), reverse=True)
    assert seen == [str(chat.chat_id) for chat in newest_first]
