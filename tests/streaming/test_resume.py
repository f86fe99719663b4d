"""Replies that outlive their connection (SPEC section 11), end to end on both databases:
resume with the original ids, replay within the window, several readers, the checks, a
stop that lands while the client does not read, a chat deleted mid-reply, shutdown."""

from __future__ import annotations

import asyncio
import socket
import uuid

import httpx
import orjson

from chatmeter.db.engine import make_engine
from chatmeter.streaming.log import MemoryLog
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows, open_reservations
from tests.support.server import RunningServer, serve
from tests.support.sse import StreamResult, parse_events, stream_message
from tests.support.waiting import eventually

SLOW = scripted(reply=" ".join(f"word{i}" for i in range(30)), chunks=30, delay_ms=30)


async def resume(client: httpx.AsyncClient, chat_id: str, user: str, **params: str) -> StreamResult:
    headers = auth(user)
    if "last_event_id_header" in params:
        headers["Last-Event-ID"] = params.pop("last_event_id_header")
    async with client.stream(
        "GET", f"/api/chat/{chat_id}/stream", params=params, headers=headers
    ) as response:
        result = StreamResult(response.status_code, response.headers)
        if response.status_code != 200:
            await response.aread()
            result.body = response.json() if response.content else None
            return result
        async for _ in parse_events(response.aiter_lines(), result):
            pass
    return result


async def test_resume_returns_exactly_the_missing_events_then_the_end(database_url: str) -> None:
    async with serve(make_settings(database_url, models={"slow": SLOW})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "rae", model="slow")
            first = await stream_message(client, chat_id, "go", token_for("rae"), stop_after=3)
            assert first.ids == [1, 2, 3, 4]  # the reply's name, then three pieces
            reply_id = first.first["message_id"]
            rest = await resume(client, chat_id, "rae", last_event_id_header="4")
            assert rest.status == 200
            assert rest.ids == list(range(5, 5 + len(rest.events)))
            end = rest.last
            assert end["done"] is True and end["message_id"] == reply_id
            assert first.text + rest.text == SLOW.reply
            rows = await chat_rows(server.engine, chat_id)
            assert rows[1].status == "complete" and rows[1].content == SLOW.reply
            # replay of the finished reply, within the window: the same events, same ids
            again = await resume(client, chat_id, "rae", last_event_id="0", message_id=reply_id)
            assert again.ids == list(range(1, 5 + len(rest.events)))
            assert again.events[:4] == first.events and again.events[4:] == rest.events
            # a resume bills nothing
            state = await books(server.engine, "rae")
            assert state.total == state.ledger == end["tokens_used"]
            assert state.reserved == 0


async def test_two_readers_see_the_same_events(database_url: str) -> None:
    async with serve(make_settings(database_url, models={"slow": SLOW})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "ty", model="slow")
            writer = asyncio.create_task(stream_message(client, chat_id, "go", token_for("ty")))

            async def streaming() -> bool:
                return await open_reservations(server.engine, "ty") == 1

            await eventually(streaming)
            reader = await resume(client, chat_id, "ty")
            original = await writer
            assert reader.status == 200
            assert reader.events == original.events and reader.ids == original.ids


async def test_nothing_to_resume_is_204_and_the_window_closes(database_url: str) -> None:
    settings = make_settings(database_url, models={"slow": SLOW}, replay_seconds=0.5)
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "uma", model="slow")
            assert (await resume(client, chat_id, "uma")).status == 204
            done = await stream_message(client, chat_id, "go", token_for("uma"))
            assert done.last["done"] is True
            # the window is 0.5 s; then the messages are in GET /api/chat/{id} only

            async def expired() -> bool:
                return (await resume(client, chat_id, "uma")).status == 204

            await eventually(expired, within=30)
            unknown = str(uuid.uuid4())
            assert (await resume(client, chat_id, "uma", message_id=unknown)).status == 204


async def test_resume_checks_like_every_chat_endpoint(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        chat_id = await new_chat(client, "vic")
        no_token = await client.get(f"/api/chat/{chat_id}/stream")
        assert no_token.status_code == 401 and no_token.json()["code"] == "UNAUTHORIZED"
        bad_id = await client.get("/api/chat/not-a-uuid/stream", headers=auth("vic"))
        assert bad_id.status_code == 400 and bad_id.json()["code"] == "INVALID_CHAT_ID"
        unknown = await client.get(f"/api/chat/{uuid.uuid4()}/stream", headers=auth("vic"))
        assert unknown.status_code == 404 and unknown.json()["code"] == "CHAT_NOT_FOUND"
        other = await client.get(f"/api/chat/{chat_id}/stream", headers=auth("wes"))
        assert other.status_code == 403 and other.json()["code"] == "FORBIDDEN"
        for params in ({"last_event_id": "-1"}, {"last_event_id": "x"}, {"message_id": "nope"}):
            bad = await client.get(
                f"/api/chat/{chat_id}/stream", params=params, headers=auth("vic")
            )
            assert bad.status_code == 400 and bad.json()["code"] == "INVALID_REQUEST", params


async def test_stop_lands_while_the_client_does_not_read(database_url: str) -> None:
    """Issue 12, break 3: a client with a small receive buffer stops reading; the reply's
    sends block, but the stop still ends the reply and frees the chat."""
    flood = scripted(
        reply="\U0001f600" * 4_000_000,  # 16 MB on the wire: more than the buffers hold
        chunks=4000,
        delay_ms=1,
        max_output_tokens=1_000_000,
        context_window=2_000_000,
    )
    settings = make_settings(database_url, models={"flood": flood}, default_token_limit=10_000_000)
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "xia", model="flood")
            host, port = server.url.removeprefix("http://").split(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, (host, int(port)))
                body = orjson.dumps({"message": "go"})
                request = (
                    f"POST /api/chat/{chat_id}/message HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {token_for('xia')}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body
                await loop.sock_sendall(sock, request)
                engine = server.engine

                log = server.services.reply_log
                assert isinstance(log, MemoryLog)

                def far_ahead_of_the_client() -> bool:
                    # 8 MB the client has not read: its response's sends block
                    return log.held_bytes > 2_000_000

                await eventually(far_ahead_of_the_client, within=30)
                stop = await client.post(f"/api/chat/{chat_id}/stop", headers=auth("xia"))
                assert stop.status_code == 202

                async def freed() -> bool:
                    return await open_reservations(engine, "xia") == 0

                await eventually(freed, within=30)
                rows = await chat_rows(engine, chat_id)
                assert rows[1].status == "stopped"
                assert 0 < len(rows[1].content) < len(flood.reply)
                state = await books(engine, "xia")
                assert state.total == state.ledger == rows[1].tokens_consumed
                assert state.reserved == 0
            finally:
                sock.close()


async def test_deleting_a_chat_stops_its_reply_first(database_url: str) -> None:
    async with serve(make_settings(database_url, models={"slow": SLOW})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "yan", model="slow")
            reading = asyncio.create_task(stream_message(client, chat_id, "go", token_for("yan")))
            engine = server.engine

            async def streaming() -> bool:
                return await open_reservations(engine, "yan") == 1

            await eventually(streaming)
            deleted = await client.delete(f"/api/chat/{chat_id}", headers=auth("yan"))
            assert deleted.status_code == 204
            result = await reading
            assert result.last["done"] is True and result.last["finish_reason"] == "stopped"
            assert len(result.chunks) < 30
            state = await books(engine, "yan")
            assert state.total == state.ledger == result.last["tokens_used"]
            assert state.reserved == 0 and state.open_reservations == 0


async def test_a_chat_deleted_while_a_message_opens_keeps_no_reply(database_url: str) -> None:
    """A message and a delete of its chat sent together, the delete a little later each
    time: the message finds the chat deleted (404), or its reply is stopped; never a
    reply that streams on in a deleted chat (the delete used to stop first, finding
    nothing, and a reply opened between its stop and its deactivation went on)."""
    async with serve(make_settings(database_url, models={"slow": SLOW})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for trial in range(8):
                user = f"race{trial}"
                chat_id = await new_chat(client, user, model="slow")

                result, deleted = await asyncio.gather(
                    stream_message(client, chat_id, "go", token_for(user)),
                    delete_later(client, chat_id, user, 0.002 * trial),
                )
                assert deleted.status_code == 204
                if result.status == 404:
                    assert result.body["code"] == "CHAT_NOT_FOUND"
                    assert await open_reservations(server.engine, user) == 0
                    continue
                assert result.status == 200, result.body
                assert result.last["finish_reason"] == "stopped", (trial, result.last)
                state = await books(server.engine, user)
                assert state.reserved == 0 and state.open_reservations == 0
                assert state.total == state.ledger


async def delete_later(
    client: httpx.AsyncClient, chat_id: str, user: str, after: float
) -> httpx.Response:
    await asyncio.sleep(after)  # not a wait for anything: a stagger
    return await client.delete(f"/api/chat/{chat_id}", headers=auth(user))


async def test_shutdown_ends_replies_cleanly(database_url: str) -> None:
    """A deploy stops the replies still streaming: saved interrupted, billed, released
    (never a chat left answering 409 until a lease runs out)."""
    slow = scripted(reply=" ".join(f"w{i}" for i in range(400)), chunks=400, delay_ms=50)
    async with serve(make_settings(database_url, models={"slow": slow})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "zed", model="slow")
            seen = await stream_message(client, chat_id, "go", token_for("zed"), stop_after=2)
            assert len(seen.chunks) == 2
    engine = make_engine(database_url)
    try:
        rows = await chat_rows(engine, chat_id)
        assert rows[1].status == "interrupted"
        assert 0 < len(rows[1].content) < len(slow.reply)
        state = await books(engine, "zed")
        assert state.total == state.ledger == rows[1].tokens_consumed > 0
        assert state.reserved == 0 and state.open_reservations == 0
    finally:
        await engine.dispose()
