"""Stop, disconnect and the 409 rule: the partial reply is saved and billed, the
reservation released, on both databases."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows, ledger_row, open_reservations
from tests.support.server import RunningServer, serve
from tests.support.sse import StreamResult, parse_events, stream_message
from tests.support.waiting import eventually

SLOW = scripted(reply=" ".join(f"word{i}" for i in range(40)), chunks=40, delay_ms=50)


async def test_stop_ends_with_stopped_and_bills_partial(database_url: str) -> None:
    async with serve(make_settings(database_url, models={"slow": SLOW})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "bob", model="slow")
            result = StreamResult(0, httpx.Headers())
            headers = auth("bob")
            async with client.stream(
                "POST", f"/api/chat/{chat_id}/message", json={"message": "go"}, headers=headers
            ) as response:
                stopped = False
                async for event in parse_events(response.aiter_lines(), result):
                    if not stopped and len(result.chunks) == 3:
                        stop = await client.post(f"/api/chat/{chat_id}/stop", headers=headers)
                        assert stop.status_code == 202, stop.text
                        stopped = True
                    if event.get("done") or event.get("error"):
                        break
            end = result.last
            assert end["done"] is True
            assert end["finish_reason"] == "stopped"
            assert 3 <= len(result.chunks) < 40
            # counted: the scripted tokenizer, ceil(len/4) per text, plus the overhead
            assert end["usage"]["source"] == "counted"
            assert end["usage"]["completion_tokens"] == -(-len(result.text) // 4)
            rows = await chat_rows(server.engine, chat_id)
            assert [(r.role, r.status) for r in rows] == [
                ("user", "complete"),
                ("assistant", "stopped"),
            ]
            assert rows[1].content == result.text
            assert rows[1].tokens_consumed == end["tokens_used"]
            assert rows[1].finish_reason == "stopped"
            state = await books(server.engine, "bob")
            assert state.total == state.ledger == end["tokens_used"]
            assert state.reserved == 0 and state.open_reservations == 0
            # the chat is free again, and a stop now has nothing to stop
            again = await client.post(f"/api/chat/{chat_id}/stop", headers=headers)
            assert again.status_code == 404
            assert again.json()["code"] == "NO_ACTIVE_REPLY"


async def test_client_leaving_lets_the_reply_finish(database_url: str) -> None:
    """CHATMETER_ON_DISCONNECT=continue, the default (SPEC section 11): the reply is a
    job of the server, not of the connection; it is saved complete and billed once."""
    fast = scripted(reply=" ".join(f"word{i}" for i in range(40)), chunks=40, delay_ms=5)
    async with serve(make_settings(database_url, models={"slow": fast})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "carl", model="slow")
            result = await stream_message(client, chat_id, "go", token_for("carl"), stop_after=2)
            assert len(result.chunks) == 2
            engine = server.engine

            async def saved() -> bool:
                return len(await chat_rows(engine, chat_id)) == 2

            await eventually(saved, within=30)
            assistant = (await chat_rows(engine, chat_id))[1]
            assert assistant.status == "complete" and assistant.content == fast.reply
            assert assistant.metering_source == "provider"
            state = await books(engine, "carl")
            assert state.total == state.ledger == assistant.tokens_consumed
            assert state.reserved == 0 and state.open_reservations == 0


async def test_client_leaving_saves_interrupted_reply(database_url: str) -> None:
    """CHATMETER_ON_DISCONNECT=stop: a client that leaves stops the reply."""
    settings = make_settings(database_url, models={"slow": SLOW}, on_disconnect="stop")
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "carol", model="slow")
            result = await stream_message(client, chat_id, "go", token_for("carol"), stop_after=2)
            assert len(result.chunks) == 2
            engine = server.engine

            async def saved() -> bool:
                return len(await chat_rows(engine, chat_id)) == 2

            await eventually(saved)
            rows = await chat_rows(engine, chat_id)
            assistant = rows[1]
            assert assistant.status == "interrupted"
            # at least what the client saw, at most a few pieces more (in flight)
            assert assistant.content.startswith(result.text)
            assert len(assistant.content) < len(SLOW.reply)
            assert assistant.metering_source == "counted"
            assert assistant.tokens_consumed > 0
            billed = await ledger_row(engine, str(assistant.message_id))
            assert billed.total_tokens == assistant.tokens_consumed
            state = await books(engine, "carol")
            assert state.total == state.ledger == assistant.tokens_consumed
            assert state.reserved == 0 and state.open_reservations == 0


async def test_second_message_while_streaming_is_409(database_url: str) -> None:
    async with serve(make_settings(database_url, models={"slow": SLOW})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "dan", model="slow")
            first = asyncio.create_task(stream_message(client, chat_id, "one", token_for("dan")))
            engine = server.engine

            async def streaming() -> bool:
                return await open_reservations(engine, "dan") == 1

            await eventually(streaming)
            second = await client.post(
                f"/api/chat/{chat_id}/message", json={"message": "two"}, headers=auth("dan")
            )
            assert second.status_code == 409
            assert second.json() == {
                "error": True,
                "code": "REPLY_IN_PROGRESS",
                "message": second.json()["message"],
            }
            done = await first
            assert done.last["done"] is True and done.last["finish_reason"] == "stop"
            # the refused message left nothing behind
            rows = await chat_rows(engine, chat_id)
            assert [r.content for r in rows if r.role == "user"] == ["one"]
            state = await books(engine, "dan")
            assert state.total == state.ledger and state.reserved == 0


async def test_idle_stream_sends_pings(database_url: str) -> None:
    slow_start = scripted(reply="late", chunks=1, delay_ms=700)
    settings = make_settings(database_url, models={"late": slow_start}, ping_interval_seconds=0.2)
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "erin", model="late")
            result = await stream_message(client, chat_id, "hello", token_for("erin"))
            assert result.text == "late"
            assert len(result.comments) >= 2
            assert all(c == ": ping" for c in result.comments)


async def test_stop_reaches_only_own_chat(server: RunningServer, client: httpx.AsyncClient) -> None:
    chat_id = await new_chat(client, "frank")
    other = await client.post(f"/api/chat/{chat_id}/stop", headers=auth("grace"))
    assert other.status_code == 403 and other.json()["code"] == "FORBIDDEN"
    missing = await client.post(
        "/api/chat/00000000-0000-0000-0000-000000000000/stop", headers=auth("frank")
    )
    assert missing.status_code == 404 and missing.json()["code"] == "CHAT_NOT_FOUND"
    idle = await client.post(f"/api/chat/{chat_id}/stop", headers=auth("frank"))
    assert idle.status_code == 404 and idle.json()["code"] == "NO_ACTIVE_REPLY"
