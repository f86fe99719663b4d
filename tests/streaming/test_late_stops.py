"""A stop that arrives late stops the reply it was asked for, never the chat's next one.

`POST .../stop` flags the reply live in the chat, then stops it here or announces the
stop to the other workers. When the stop reaches the reply's worker only after that reply
ended (stopped by the poll of its flag, or finished) and the user opened a new reply in
the same chat, the stop was announced by chat id and stopped the new reply, which nobody
asked to stop. Each test holds one step of the stop back until the new reply streams,
then lets it go: the new reply must run to its end."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest

from chatmeter.db.steps import Steps
from chatmeter.db.transactor import Transactor
from chatmeter.metering.reservations import flagged_stops
from chatmeter.streaming.log import ReplyLog
from chatmeter.streaming.signals import StopSignals
from chatmeter.streaming.stopping import flag_stop
from tests.conftest import auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.streaming.test_scale_out import two_workers
from tests.support.db import chat_rows, open_reservations
from tests.support.redis import RedisServer
from tests.support.server import RunningServer, serve
from tests.support.sse import StreamResult, is_piece, parse_events, stream_message
from tests.support.waiting import eventually

SLOW = scripted(reply=" ".join(f"word{i}" for i in range(40)), chunks=40, delay_ms=50)


class HeldSignals:
    """A worker's stop signals whose announcements wait until `release` is set."""

    def __init__(self, inner: StopSignals) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def publish(self, reply: uuid.UUID) -> None:
        self.entered.set()
        await self.release.wait()
        await self.inner.publish(reply)

    async def run(self, on_stop: Callable[[uuid.UUID], object], resync: Any) -> None:
        await self.inner.run(on_stop, resync)


class HeldTransactor:
    """A worker's transactor that, once a stop is flagged, holds the answer back until
    `release` is set (the stop request then goes on to stop the reply)."""

    def __init__(self, inner: Transactor) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, steps: Callable[..., Steps[Any]], *args: Any, **kwargs: Any) -> Any:
        result = await self.inner.run(steps, *args, **kwargs)
        if steps is flag_stop:
            self.entered.set()
            await self.release.wait()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HeldLog:
    """A worker's reply log whose `begin` (after the opening committed, before the job
    registers the reply) waits until `release` is set."""

    def __init__(self, inner: ReplyLog) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def begin(self, *args: Any, **kwargs: Any) -> None:
        self.entered.set()
        await self.release.wait()
        await self.inner.begin(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def first_reply_stopped(on_reply: httpx.AsyncClient, chat_id: str, stopping: Any) -> None:
    """Stream a reply on `on_reply`, ask `stopping()` (a task that posts the stop) after
    its first piece, and read it to its end: stopped by the poll of its flag."""
    result = StreamResult(0, httpx.Headers())
    async with on_reply.stream(
        "POST", f"/api/chat/{chat_id}/message", json={"message": "one"}, headers=auth("lea")
    ) as response:
        assert response.status_code == 200
        async for event in parse_events(response.aiter_lines(), result):
            if len(result.chunks) == 1 and is_piece(event):
                stopping()
            if event.get("done") or event.get("error"):
                break
    assert result.last["finish_reason"] == "stopped", result.last


async def second_reply(on_reply: httpx.AsyncClient, chat_id: str, release: asyncio.Event) -> Any:
    """Stream the chat's next reply; once its first piece is in, let the stop go on."""
    result = StreamResult(0, httpx.Headers())
    async with on_reply.stream(
        "POST", f"/api/chat/{chat_id}/message", json={"message": "two"}, headers=auth("lea")
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for event in parse_events(response.aiter_lines(), result):
            if is_piece(event):
                release.set()
            if event.get("done") or event.get("error"):
                break
    return result


async def late_stop(a: RunningServer, b: RunningServer, hold: HeldSignals | HeldTransactor) -> None:
    """The reply streams on `a`, its stop is posted to `b` and held at `hold`; the next
    reply streams on `a` before the stop goes on."""
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            chat_id = await new_chat(on_a, "lea", model="slow")
            stops: list[asyncio.Task[httpx.Response]] = []

            def post_stop() -> None:
                stop = on_b.post(f"/api/chat/{chat_id}/stop", headers=auth("lea"))
                stops.append(asyncio.create_task(stop))

            await first_reply_stopped(on_a, chat_id, post_stop)
            await hold.entered.wait()  # the stop was flagged, and waits
            assert await open_reservations(a.engine, "lea") == 0
            second = await second_reply(on_a, chat_id, hold.release)
            assert (await stops[0]).status_code == 202
    assert second.last.get("done") is True, second.last
    assert second.last["finish_reason"] == "stop", "a late stop ended the next reply"
    assert second.text == SLOW.reply
    rows = await chat_rows(a.engine, chat_id)
    assert [r.status for r in rows if r.role == "assistant"] == ["stopped", "complete"]


async def test_a_late_announcement_through_redis_spares_the_next_reply(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_url=redis_server.url) as (a, b):
        held = HeldSignals(b.services.stop_signals)
        b.services.stop_signals = held
        await late_stop(a, b, held)


# PostgreSQL LISTEN/NOTIFY alone: SQLite has no announcement, only the poll
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_late_notification_spares_the_next_reply(database_url: str) -> None:
    async with two_workers(database_url) as (a, b):
        held = HeldSignals(b.services.stop_signals)
        b.services.stop_signals = held
        await late_stop(a, b, held)


async def test_a_late_local_stop_spares_the_next_reply(database_url: str) -> None:
    """The stop posted to the worker that holds the reply, held between the flag and
    the local stop."""
    async with serve(make_settings(database_url, models={"slow": SLOW})) as a:
        held = HeldTransactor(a.services.transactor)
        a.services.transactor = cast(Transactor, held)
        await late_stop(a, a, held)


async def test_a_client_leaving_after_its_reply_spares_the_next_reply(
    database_url: str,
) -> None:
    """CHATMETER_ON_DISCONNECT=stop: the client of the first reply is slow to read (its
    response is held at a send, as a full socket holds it) and leaves only after the
    reply ended and the next one began: its leaving must not interrupt the next one."""
    settings = make_settings(database_url, models={"slow": SLOW}, on_disconnect="stop")
    async with serve(settings) as a:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
            chat_id = await new_chat(on_a, "lea", model="slow")
            body = json.dumps({"message": "one"}).encode()
            token = token_for("lea").encode()
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": f"/api/chat/{chat_id}/message",
                "raw_path": f"/api/chat/{chat_id}/message".encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"test"),
                    (b"authorization", b"Bearer " + token),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "state": {},
            }
            sent: list[dict[str, Any]] = []
            first_piece = asyncio.Event()
            unblock = asyncio.Event()
            leave = asyncio.Event()
            requests = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if requests:
                    return requests.pop()
                await leave.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)
                if b"word" in message.get("body", b""):
                    first_piece.set()
                    await unblock.wait()  # the client reads no more (a full socket)

            first = asyncio.create_task(a.app(scope, receive, send))  # type: ignore[arg-type]
            await first_piece.wait()

            async def first_ended() -> bool:
                rows = await chat_rows(a.engine, chat_id)
                return len(rows) == 2 and await open_reservations(a.engine, "lea") == 0

            await eventually(first_ended)
            second = await second_reply(on_a, chat_id, leave)
            unblock.set()
            await first
    assert sent[0]["status"] == 200
    assert second.last.get("done") is True, second.last
    assert second.last["finish_reason"] == "stop", "the first client's leaving ended the next"
    rows = await chat_rows(a.engine, chat_id)
    assert [r.status for r in rows if r.role == "assistant"] == ["complete", "complete"]


class BlindPoll:
    """A worker's registry transactor whose poll of the stop flags finds none: only the
    local stop or the announcement can stop a reply."""

    def __init__(self, inner: Transactor) -> None:
        self.inner = inner

    async def run(self, steps: Callable[..., Steps[Any]], *args: Any, **kwargs: Any) -> Any:
        if steps is flagged_stops:
            return []
        return await self.inner.run(steps, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def stop_while_opening(a: RunningServer, b: RunningServer) -> None:
    """The reply's reservation is in (the stop finds it: 202) but its job has not yet
    registered it: the local stop, or the announcement, found nothing to stop, and the
    reply ran on until the poll of its flag (every 0.5 s, not the 100 ms of SPEC 11).
    With the poll blind, the stop alone must end it, before it asked the provider."""
    held = HeldLog(a.services.reply_log)
    a.services.reply_log = cast(ReplyLog, held)
    a.services.replies.transactor = cast(Transactor, BlindPoll(a.services.replies.transactor))
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as on_a:
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as on_b:
            chat_id = await new_chat(on_a, "max", model="slow")
            token = token_for("max")
            reading = asyncio.create_task(stream_message(on_a, chat_id, "go", token))
            await held.entered.wait()
            stop = await on_b.post(f"/api/chat/{chat_id}/stop", headers=auth("max"))
            assert stop.status_code == 202
            # the announcement reaches `a` when it does (a NOTIFY, a Redis message): the
            # opening is held until `a` has it, else under load the job registered first
            # and asked the provider (stopped all the same, its prompt billed: 1 run in 4)
            await eventually(lambda: bool(a.services.replies._early))
            held.release.set()
            result = await reading
    assert result.last["finish_reason"] == "stopped", result.last
    assert result.chunks == [] and result.last["tokens_used"] == 0
    rows = await chat_rows(a.engine, chat_id)
    assert rows[1].status == "stopped" and rows[1].content == ""
    assert await open_reservations(a.engine, "max") == 0


async def test_a_stop_while_the_reply_opens_stops_it(database_url: str) -> None:
    async with serve(make_settings(database_url, models={"slow": SLOW})) as a:
        await stop_while_opening(a, a)


async def test_a_stop_from_another_worker_while_the_reply_opens_stops_it(
    database_url: str, redis_server: RedisServer
) -> None:
    async with two_workers(database_url, redis_url=redis_server.url) as (a, b):
        await stop_while_opening(a, b)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_notified_stop_while_the_reply_opens_stops_it(database_url: str) -> None:
    async with two_workers(database_url) as (a, b):
        await stop_while_opening(a, b)
