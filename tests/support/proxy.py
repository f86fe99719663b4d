"""A loopback TCP proxy that can drop a connection mid-response: a network that fails
under a client, for the tests of resuming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class CuttingProxy:
    """Forwards to `upstream`; the first response that carries `events` server-sent
    events is cut right after the last of them, both ways, as a dropped network does."""

    def __init__(self, upstream_port: int, events: int) -> None:
        self._upstream_port = upstream_port
        self._events = events
        self.cuts = 0
        self.url = ""

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, watch: bool
    ) -> None:
        seen = b""
        try:
            while chunk := await reader.read(65536):
                if watch and self.cuts == 0:
                    before = len(seen)
                    seen += chunk
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
        upstream = asyncio.ensure_future(self._pipe(client_r, up_w, watch=False))
        downstream = asyncio.ensure_future(self._pipe(up_r, client_w, watch=True))
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
async def cutting_proxy(upstream_url: str, events: int) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(int(upstream_url.rsplit(":", 1)[1]), events)
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy.url = f"http://127.0.0.1:{port}"
    try:
        yield proxy
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
