"""Make the database unreachable on demand: a TCP proxy in front of PostgreSQL that can
be cut, or an exclusive lock held on the SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

from tests.support.postgres import PostgresServer


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` drops every connection and refuses
    new ones until `restore()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.down = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        self.down = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class DatabaseOutage:
    """`await outage.begin()` / `outage.end()` for either backend; `url` is what the
    app must be given."""

    def __init__(self, database_url: str) -> None:
        self.original = database_url
        self.url = database_url
        self._proxy: TcpProxy | None = None
        self._lock: sqlite3.Connection | None = None

    async def __aenter__(self) -> DatabaseOutage:
        if self.original.startswith("postgresql"):
            parts = urlsplit(self.original)
            self._proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
            await self._proxy.start()
            netloc = f"{parts.username}@127.0.0.1:{self._proxy.port}"
            self.url = urlunsplit(parts._replace(netloc=netloc))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.end()
        if self._proxy is not None:
            await self._proxy.close()

    def begin(self) -> None:
        if self._proxy is not None:
            self._proxy.cut()
            return
        path = self.original.split(":///", 1)[1]
        self._lock = sqlite3.connect(path, isolation_level=None)
        self._lock.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        if self._proxy is not None:
            self._proxy.restore()
        if self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None


class LostAnswerProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL, and loses the answer to one statement:
    on the first connection that sends `marker` (the text of a statement, as asyncpg
    prepares it), the preparation's answer passes; once the client has sent the
    statement's execution, the connection is dropped, both ways, as the answer to it
    arrives. The server has run the statement (committed it, if it ran alone); the
    client never hears so, as with a network that fails at that moment. Once only:
    later connections pass."""

    def __init__(self, target_host: str, target_port: int, marker: bytes) -> None:
        self.target = (target_host, target_port)
        self.marker = marker
        self.port = 0
        self.lost = 0  # answers lost
        self._armed = True
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        sent = bytearray()  # the tail of what the client sent, while the marker is looked for
        stage = "looking"  # -> "prepared" (marker sent) -> "executed" (the next request sent)

        async def upstream() -> None:
            nonlocal stage
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    if stage == "prepared":
                        stage = "executed"
                    elif stage == "looking" and self._armed:
                        sent.extend(data)
                        if self.marker in sent:
                            self._armed = False
                            stage = "prepared"
                        del sent[: max(0, len(sent) - len(self.marker))]
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            with contextlib.suppress(Exception):
                while data := await up_reader.read(65536):
                    if stage == "executed":  # the answer to the execution: lost
                        self.lost += 1
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# the opening's one statement on PostgreSQL, as asyncpg prepares it
OPENING_MARKER = b"held AS (INSERT INTO reservations"


@contextlib.asynccontextmanager
async def opening_answer_lost(
    postgres: PostgresServer, template: str
) -> AsyncIterator[tuple[str, LostAnswerProxy]]:
    """A fresh database reached through a `LostAnswerProxy` that loses the answer to the
    first opening: chatmeter's URL through it, and the proxy."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, template)
    parts = urlsplit(postgres.url(name))
    proxy = LostAnswerProxy(parts.hostname or "127.0.0.1", parts.port or 5432, OPENING_MARKER)
    await proxy.start()
    try:
        yield urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}")), proxy
    finally:
        await proxy.close()
