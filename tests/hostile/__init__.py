"""Hostile input: tokens, bodies, text, other users' chats, logs, and schemathesis.

Shared here: a raw HTTP/1.1 request, for what a well-behaved client library refuses to
send (trailing spaces, NUL bytes, a body longer than its Content-Length says)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(base_url: str, head: bytes, body: bytes = b"") -> RawResponse:
    """Send `head` (request line and headers, no blank line) and `body` as they are;
    read the answer to the end (the request asks the server to close)."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()
    finally:
        writer.close()
    header_block, _, content = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        content = _dechunk(content)
    return RawResponse(int(status_line.split()[1]), headers, content)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
