"""Hostile connections (SPEC §4): request heads over 64 KiB are 431 and are not read
further, a client that sends its request too slowly is cut off without slowing anyone
else down, and what the HTTP parser refuses is answered in the contract's JSON shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from chatmeter.http_protocol import MAX_HEAD_BYTES
from tests.conftest import TEST_SECRET, auth, make_settings
from tests.hostile import raw_request
from tests.support.process import chatmeter_process
from tests.support.server import RunningServer, serve
from tests.support.shared_server import fresh_database_url

READ_TIMEOUT = 2.0
# how long a cut-off may take on a busy machine: many times the timeout
CUT_WITHIN = 30.0
RESETS = (ConnectionResetError, BrokenPipeError)
SCRIPTED_ONLY = 'default_model = "scripted"\n[models.scripted]\nprovider = "scripted"\n'


@pytest.fixture(scope="module")
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    # what is tested lives below the application: one database backend is enough here;
    # the subprocess test below runs `chatmeter serve --workers 2`
    url = fresh_database_url("sqlite", request, tmp_path_factory.mktemp("http"))
    async with serve(make_settings(url, request_read_timeout_seconds=READ_TIMEOUT)) as running:
        yield running


async def connect(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(base_url)
    return await asyncio.open_connection(url.hostname, url.port)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; b"" if it reset the connection instead."""
    try:
        async with asyncio.timeout(CUT_WITHIN):
            return await reader.read()
    except RESETS:
        return b""


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def error_of(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    error: dict[str, object] = json.loads(body)
    assert error == {"error": True, "code": error["code"], "message": error["message"]}
    return error


def head_of(size: int, path: bytes = b"/healthz") -> bytes:
    """A complete GET request head of exactly `size` bytes."""
    start = b"GET " + path + b" HTTP/1.1\r\nHost: chatmeter\r\nConnection: close\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


async def flood_head(base_url: str, total: int) -> tuple[bytes, int]:
    """Send a request head of `total` bytes in 64 KiB writes while reading the answer.
    Returns the answer and how many bytes were written before the server cut us off."""
    reader, writer = await connect(base_url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: chatmeter\r\nX-Flood: ")
    sent = 0

    async def write() -> None:
        nonlocal sent
        piece = b"a" * 65536
        with contextlib.suppress(*RESETS):
            while sent < total:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
            writer.write(b"\r\n\r\n")
            await writer.drain()

    writing = asyncio.create_task(write())
    try:
        answer = await read_answer(reader)
        async with asyncio.timeout(CUT_WITHIN):
            await writing
    finally:
        writing.cancel()
        writer.close()
    return answer, sent


async def test_a_head_over_64_kib_is_431(server: RunningServer) -> None:
    reader, writer = await connect(server.url)
    writer.write(head_of(MAX_HEAD_BYTES + 1))
    answer = await read_answer(reader)
    writer.close()
    assert status_of(answer) == 431, answer[:200]
    assert error_of(answer)["code"] == "HEADERS_TOO_LARGE"


async def test_a_head_of_64_kib_is_served(server: RunningServer) -> None:
    reader, writer = await connect(server.url)
    writer.write(head_of(MAX_HEAD_BYTES))
    answer = await read_answer(reader)
    writer.close()
    assert status_of(answer) == 200, answer[:200]


async def test_the_limit_counts_the_url_too(server: RunningServer) -> None:
    reader, writer = await connect(server.url)
    writer.write(head_of(MAX_HEAD_BYTES + 1, path=b"/healthz?" + b"q" * MAX_HEAD_BYTES))
    answer = await read_answer(reader)
    writer.close()
    assert status_of(answer) == 431, answer[:200]


async def test_a_flood_of_header_bytes_is_cut_off_unread(server: RunningServer) -> None:
    """64 MB of one header: the server stops reading soon after 64 KiB (what the kernel
    buffers on loopback is a few MB), answers 431 or resets, and serves the next client."""
    total = 64 * 1024 * 1024
    answer, sent = await flood_head(server.url, total)
    assert sent < total, "the server read the whole 64 MB head"
    if answer:
        assert status_of(answer) == 431, answer[:200]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_many_requests_under_the_limit_on_one_connection_are_served(
    server: RunningServer,
) -> None:
    """The 64 KiB are per request: a kept-alive connection is not cut after 64 KiB."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for _ in range(4):
            response = await client.get("/healthz", headers={"X-Pad": "a" * 40_000})
            assert response.status_code == 200


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float = 1.0) -> None:
    """Send `data` a byte at a time, one a second, until the server goes away."""
    with contextlib.suppress(*RESETS):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)  # the slowness under test, not a synchronisation


async def cut_off_while_trickling(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> tuple[bytes, float]:
    """Trickle `data` until the server closes; its answer, and how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sending = asyncio.create_task(trickle(writer, data))
    try:
        answer = await read_answer(reader)
    finally:
        sending.cancel()
        writer.close()
    return answer, loop.time() - started


SLOW_HEAD = b"Host: chatmeter\r\n" + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"


async def test_a_slow_head_is_cut_off_and_others_are_served(server: RunningServer) -> None:
    reader, writer = await connect(server.url)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    served: list[int] = []

    async def others() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            while True:
                served.append((await client.get("/healthz")).status_code)
                await asyncio.sleep(0.2)

    other_clients = asyncio.create_task(others())
    try:
        answer, took = await cut_off_while_trickling(reader, writer, SLOW_HEAD)
    finally:
        other_clients.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await other_clients
    assert took < CUT_WITHIN
    assert status_of(answer) == 408, answer[:200]
    assert error_of(answer)["code"] == "REQUEST_TIMEOUT"
    assert served and set(served) == {200}


async def test_a_connection_that_sends_nothing_is_closed(server: RunningServer) -> None:
    reader, writer = await connect(server.url)
    answer = await read_answer(reader)  # times out (and fails) if never closed
    writer.close()
    assert answer == b""


async def test_a_slow_second_request_on_a_kept_alive_connection_is_cut_off(
    server: RunningServer,
) -> None:
    reader, writer = await connect(server.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: chatmeter\r\n\r\n")
    async with asyncio.timeout(CUT_WITHIN):
        first = await reader.readuntil(b'{"status":"ok"}')
    assert status_of(first) == 200
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    answer, _ = await cut_off_while_trickling(reader, writer, SLOW_HEAD)
    assert status_of(answer) == 408, answer[:200]


async def test_a_slow_body_is_cut_off_quietly(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await connect(server.url)
    token = auth("slow-body")["Authorization"].encode()
    writer.write(
        b"POST /api/chat HTTP/1.1\r\nHost: chatmeter\r\nAuthorization: " + token + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    answer, _ = await cut_off_while_trickling(reader, writer, b'{"title": "' + b"t" * 200)
    assert answer == b""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        chats = await client.get("/api/chat", headers=auth("slow-body"))
    assert chats.json()["chats"] == []
    # a client that leaves mid-body is not a server error
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


PARSER_REFUSES = {
    "unknown method": b"FROB /healthz HTTP/1.1\r\nHost: chatmeter",
    "content-length not a number": b"POST /api/chat HTTP/1.1\r\nContent-Length: abc",
    "negative content-length": b"POST /api/chat HTTP/1.1\r\nContent-Length: -1",
    "two content-lengths": b"POST /api/chat HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
    "no request line": b"GARBAGE",
    "unknown version": b"GET /healthz HTTP/7.3",
    "control byte in the path": b"GET /he\x01althz HTTP/1.1",
    "space in a header name": b"GET /healthz HTTP/1.1\r\nBad Name: x",
    "header without a colon": b"GET /healthz HTTP/1.1\r\nNoColonHere",
    "chunked and content-length": (
        b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
    ),
}


@pytest.mark.parametrize("name", PARSER_REFUSES)
async def test_what_the_parser_refuses_is_400_in_the_error_shape(
    server: RunningServer, name: str
) -> None:
    response = await raw_request(server.url, PARSER_REFUSES[name])
    assert response.status == 400, (name, response)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["code"] == "INVALID_REQUEST"
    assert response.json()["error"] is True


def session_peak_rss_kib(port: int) -> int:
    """Peak resident memory (VmHWM) summed over `chatmeter serve --port PORT` and every
    process of its session (its workers, their SQLite writers)."""
    proc = Path("/proc")
    leader = next(
        int(entry.name)
        for entry in proc.iterdir()
        if entry.name.isdigit()
        and (entry / "cmdline").exists()
        and f"--port\0{port}\0".encode() in (entry / "cmdline").read_bytes()
    )
    total = 0
    for entry in proc.iterdir():
        try:
            stat = (entry / "stat").read_text()
            session = int(stat.rsplit(")", 1)[1].split()[3])
            if session != leader:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or one that just ended
    return total


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_chatmeter_serve_bounds_heads_and_cuts_off_slow_clients(
    database_url: str, tmp_path: Path
) -> None:
    """`chatmeter serve --workers 2`: ten clients each sending a 16 MB head do not grow
    the workers' memory, and the read timeout comes from its setting."""
    extra = {"CHATMETER_REQUEST_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT)}
    with chatmeter_process(
        database_url, TEST_SECRET, SCRIPTED_ONLY, tmp_path, workers=2, extra_env=extra
    ) as url:
        port = urlsplit(url).port
        assert port is not None
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for _ in range(4):  # each worker has served something
                assert (await client.get("/healthz")).status_code == 200
        before = session_peak_rss_kib(port)
        size = 16 * 1024 * 1024
        results = await asyncio.gather(*(flood_head(url, size) for _ in range(10)))
        grown_mib = (session_peak_rss_kib(port) - before) / 1024
        assert grown_mib < 40, f"peak memory grew by {grown_mib:.0f} MiB"
        for answer, sent in results:
            assert sent < size
            assert not answer or status_of(answer) == 431, answer[:200]

        reader, writer = await connect(url)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        answer, _ = await cut_off_while_trickling(reader, writer, SLOW_HEAD)
        assert status_of(answer) == 408, answer[:200]
