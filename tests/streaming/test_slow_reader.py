"""A reader that reads slower than its reply is generated (SPEC sections 5 and 11): the
reply's job runs to its end whatever the client does, and the log may drop the finished
reply (its replay window over, or the size bound reached) while the reader is still
behind. The reader must still get every piece and the end event: "the pieces, joined,
are exactly the saved assistant content", and "the stream ends after the end or the
error event"."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import orjson

from chatmeter.db.engine import make_engine
from chatmeter.streaming.log import MemoryLog
from tests.conftest import make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import chat_rows, open_reservations
from tests.support.server import serve
from tests.support.waiting import eventually

# 8 MB on the wire: more than the socket buffers and the transport's hold, so the
# response's sends block while the client does not read
BIG = scripted(
    reply="\U0001f600" * 2_000_000,
    chunks=2000,
    delay_ms=1,
    max_output_tokens=1_000_000,
    context_window=2_000_000,
)


def dechunk(raw: bytes) -> bytes:
    """The body of an HTTP/1.1 response with `Transfer-Encoding: chunked`."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    body = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(body)
        body += rest[:size]
        rest = rest[size + 2 :]


def sse_events(body: bytes) -> list[dict[str, Any]]:
    events = []
    for block in body.split(b"\n\n"):
        data = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(json.loads(b"\n".join(data)))
    return events


async def test_a_reader_behind_a_dropped_reply_still_gets_all_of_it(database_url: str) -> None:
    """The size bound at its least: a finished reply is dropped from memory at once. Its
    own POST response, still sending what the client has not read, used to find the
    reply gone at its next read and end the stream there: without the rest of the
    pieces and without the end event."""
    settings = make_settings(
        database_url,
        models={"big": BIG},
        default_token_limit=10_000_000,
        replay_max_bytes=1024,
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "sam", model="big")
        log = server.services.reply_log
        assert isinstance(log, MemoryLog)
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
                f"Authorization: Bearer {token_for('sam')}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            await loop.sock_sendall(sock, request)

            async def settled_and_dropped() -> bool:
                # the reply ended, was billed, and the log no longer holds it, while
                # the client has read nothing yet
                return await open_reservations(server.engine, "sam") == 0 and len(log) == 0

            await eventually(settled_and_dropped, within=60)
            raw = bytearray()
            while chunk := await loop.sock_recv(sock, 1 << 20):
                raw += chunk
        finally:
            sock.close()
    events = sse_events(dechunk(bytes(raw)))
    rows = await saved_rows(database_url, chat_id)
    assert rows[1].status == "complete"
    pieces = "".join(e["chunk"] for e in events[1:] if e.get("done") is False)
    assert events[-1].get("done") is True, "the stream ended without its end event"
    assert events[-1]["message_id"] == events[0]["message_id"]
    assert pieces == rows[1].content == BIG.reply


async def saved_rows(database_url: str, chat_id: str) -> list[Any]:
    engine = make_engine(database_url)
    try:
        return await chat_rows(engine, chat_id)
    finally:
        await engine.dispose()
