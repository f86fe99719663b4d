"""Server-sent events for one exchange (SPEC section 5).

A plain ASGI response rather than Starlette's StreamingResponse: it numbers the events,
sends `: ping` when the stream is idle, and notices a client that goes away even while
the exchange waits on the provider (it then cancels the exchange, which saves the
partial reply as interrupted). The watching starts 50 ms into the stream: most replies
of a fast model are over by then, and a task per stream was 4% of an exchange's CPU."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from chatmeter.jsonutil import dumps

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]
PING = b": ping\n\n"
WATCH_AFTER_SECONDS = 0.05


def encode_event(event_id: int, data: dict[str, Any]) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event_id, dumps(data))


class EventStream(Response):
    def __init__(
        self,
        events: AsyncGenerator[dict[str, Any], None],
        *,
        ping_interval: float,
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        # no super().__init__: this response writes its own start and body
        self.status_code = 200
        self.background = None
        self._events = events
        self._ping_interval = ping_interval
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        state = {"last_sent": loop.time(), "finished": False, "gone": False}

        async def watch() -> None:
            while not state["finished"]:
                try:
                    async with asyncio.timeout(self._ping_interval):
                        message = await receive()
                except TimeoutError:
                    if loop.time() - state["last_sent"] >= self._ping_interval * 0.9:
                        state["last_sent"] = loop.time()
                        await send({"type": "http.response.body", "body": PING, "more_body": True})
                    continue
                if message["type"] == "http.disconnect":
                    if not state["finished"]:
                        state["gone"] = True
                        task.cancel()
                    return

        watcher: asyncio.Task[None] | None = None

        def start_watching() -> None:
            nonlocal watcher
            if not state["finished"]:
                watcher = loop.create_task(watch())

        # a client that leaves sooner is noticed at WATCH_AFTER_SECONDS
        start_watcher = loop.call_later(WATCH_AFTER_SECONDS, start_watching)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            event_id = 0
            async for event in self._events:
                event_id += 1
                body = encode_event(event_id, event)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                state["last_sent"] = loop.time()
            state["finished"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise  # not the client leaving (a server shutdown): pass it on
            task.uncancel()  # the client left; the exchange saved its partial reply
        except OSError:
            pass  # the connection closed under a send: the same as leaving
        finally:
            state["finished"] = True
            start_watcher.cancel()
            if watcher is not None:
                watcher.cancel()
            with contextlib.suppress(Exception):
                await self._events.aclose()
            await self._on_close()
