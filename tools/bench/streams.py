"""Many slow streams held open at once, read by a small HTTP/1.1 client that timestamps
every event as it arrives (wrk only sees whole responses).

The client runs in the benchmark's own process on uvloop, never in the server's."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tools.bench.load import Slot


@dataclass(slots=True)
class StreamRecord:
    """One stream as the client saw it (perf_counter seconds)."""

    sent_at: float = 0.0
    piece_times: list[float] = field(default_factory=list)
    ended_at: float | None = None
    closed_at: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ended_at is not None


def _request(host: str, path: str, token: str, message: str) -> bytes:
    body = json.dumps({"message": message}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_events(reader: asyncio.StreamReader, record: StreamRecord) -> None:
    """Read a chunked SSE body, stamping each piece; stop at the end or an error event."""
    buffer = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            break
        buffer += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            now = time.perf_counter()
            if b'"done":true' in event:
                record.ended_at = now
            elif b'"error":true' in event:
                record.error = "error event: " + event.decode(errors="replace")[-120:]
            elif b'"chunk":""' in event:
                continue  # the first event names the reply: it is not a piece
            elif b"data:" in event:
                record.piece_times.append(now)
    if record.ended_at is None and record.error is None:
        record.error = "the stream ended without an end event"


async def run_stream(url: str, slot: Slot, message: str, give_up_after: float) -> StreamRecord:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    record = StreamRecord()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(give_up_after):
            reader, writer = await asyncio.open_connection(host, port)
            record.sent_at = time.perf_counter()
            writer.write(_request(f"{host}:{port}", slot.path, slot.token, message))
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            if status != b"200":
                record.error = f"HTTP {status.decode()}"
            elif b"transfer-encoding: chunked" not in head.lower():
                record.error = "the answer is not chunked"
            else:
                await _read_events(reader, record)
    except TimeoutError:
        record.error = f"no end event within {give_up_after:.0f}s"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.closed_at = time.perf_counter()
        if writer is not None:
            writer.close()
    return record


async def hold_streams(
    url: str, slots: list[Slot], *, message: str, ramp_seconds: float, give_up_after: float
) -> list[StreamRecord]:
    """Open one stream per slot, spread evenly over `ramp_seconds`, and read them all."""
    interval = ramp_seconds / max(1, len(slots))

    async def staggered(index: int, slot: Slot) -> StreamRecord:
        await asyncio.sleep(index * interval)
        return await run_stream(url, slot, message, give_up_after)

    return list(await asyncio.gather(*(staggered(i, s) for i, s in enumerate(slots))))


def peak_concurrency(records: list[StreamRecord]) -> int:
    """The most streams that were streaming (first piece received, not yet closed) at one
    moment: a request still waiting for the server to start it does not count."""
    edges: list[tuple[float, int]] = []
    for r in records:
        if r.piece_times:
            edges.append((r.piece_times[0], 1))
            edges.append((r.closed_at, -1))
    edges.sort()
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak


def piece_lateness_ms(
    records: list[StreamRecord],
    delay_seconds: float,
    since: float = 0.0,
    until: float = float("inf"),
) -> list[float]:
    """How much later than the scripted pause each piece after the first arrived: the
    gap to the previous piece minus the pause. Only pieces that arrived in
    [`since`, `until`) count."""
    late: list[float] = []
    for r in records:
        for previous, at in zip(r.piece_times, r.piece_times[1:], strict=False):
            if since <= at < until:
                late.append(max(0.0, (at - previous - delay_seconds) * 1000))
    return late


def first_piece_lateness_ms(records: list[StreamRecord], delay_seconds: float) -> list[float]:
    """Request sent to first piece, beyond the scripted pause: the time the server took
    to start the exchange (auth, checks, reservation), queueing included."""
    return [
        max(0.0, (r.piece_times[0] - r.sent_at - delay_seconds) * 1000)
        for r in records
        if r.piece_times
    ]
