"""A loopback TCP proxy that can drop a connection mid-response: a network that fails
under a client, for the tests of resuming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Watch:
    """One connection: whether its current response is the one to cut, and what of it
    has passed."""

    def __init__(self, armed: bool) -> None:
        self.armed = armed
        self.seen = b""


class CuttingProxy:
    """Forwards to `upstream`; the first response that carries `events` server-sent
    events is cut right after the last of them, both ways, as a dropped network does.
    With `request_marker`, only a response to a request containing those bytes is cut
    (a browser loads files over the same connections first)."""

    def __init__(
        self, upstream_port: int, events: int, request_marker: bytes | None = None
    ) -> None:
        self._upstream_port = upstream_port
        self._events = events
        self._marker = request_marker
        self.cuts = 0
        self.url = ""

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        watch: _Watch | None,
        arm: _Watch | None = None,
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if arm is not None and self._marker is not None and self._marker in chunk:
                    arm.armed, arm.seen = True, b""
                if watch is not None and watch.armed and self.cuts == 0:
                    seen = watch.seen
                    before = len(seen)
                    seen += chunk
                    watch.seen = seen
                    end = _end_of_event(seen, self._events)
                    if end is not None:
                        self.cuts += 1
                        writer.write(chunk[: end - before])
                        await writer.drain()
                        raise ConnectionResetError("cut")
                writer.write(chunk)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        watch = _Watch(armed=self._marker is None)
        upstream = asyncio.ensure_future(self._pipe(client_r, up_w, watch=None, arm=watch))
        downstream = asyncio.ensure_future(self._pipe(up_r, client_w, watch=watch))
        _, pending = await asyncio.wait([upstream, downstream], return_when="FIRST_EXCEPTION")
        for task in pending:
            task.cancel()
        for task in (upstream, downstream):
            with contextlib.suppress(BaseException):
                await task
        for writer in (client_w, up_w):
            writer.transport.abort()


def _end_of_event(data: bytes, count: int) -> int | None:
    """Where the `count`-th event ends in `data` (events end with a blank line)."""
    at = data.find(b"\r\n\r\n")  # the response's headers
    for _ in range(count):
        if at < 0:
            return None
        at = data.find(b"\n\n", at + 2)
    return None if at < 0 else at + 2


@asynccontextmanager
async def cutting_proxy(
    upstream_url: str, events: int, request_marker: bytes | None = None
) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(int(upstream_url.rsplit(":", 1)[1]), events, request_marker)
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy.url = f"http://127.0.0.1:{port}"
    try:
        yield proxy
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
