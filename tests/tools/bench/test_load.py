"""The wrk script under real wrk: each thread its own client, first requests spread."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tools.bench.load import Slot, write_script, wrk_path

CLIENTS = 4
SPREAD_SECONDS = 1.2
BODY = b'data: {"done":true}\n\n'


class RecordingServer:
    """Answers every POST at once with an ended stream; notes how long each client's first
    request came after its connection (each wrk thread: one connection, one path)."""

    def __init__(self) -> None:
        self.waited: dict[str, float] = {}
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected = time.monotonic()
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                self.waited.setdefault(path, time.monotonic() - connected)
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def run_wrk(tmp_path: Path, spread_seconds: float) -> RecordingServer:
    slots = [Slot(f"c{i}", f"/chat/{i}", f"token-{i}") for i in range(CLIENTS)]
    script = tmp_path / f"load-{spread_seconds}.lua"
    write_script(script, slots, "hi", spread_seconds)
    recording = RecordingServer()
    server = await asyncio.start_server(recording.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        wrk = await asyncio.create_subprocess_exec(
            wrk_path(),
            f"-t{CLIENTS}",
            f"-c{CLIENTS}",
            "-d3s",  # whole seconds: wrk reads no fractions
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await wrk.communicate()
    assert wrk.returncode == 0, out
    assert b"BENCH_JSON" in out
    return recording


async def test_a_spread_holds_each_clients_first_request_back_by_its_share(
    tmp_path: Path,
) -> None:
    recording = await run_wrk(tmp_path, SPREAD_SECONDS)
    assert len(recording.waited) == CLIENTS
    # a timer never fires early, so client i's first request comes at least i shares after
    # its connection was made (less a margin for this loop's lateness in noting the
    # connection)
    share = SPREAD_SECONDS / CLIENTS
    for i in range(1, CLIENTS):
        waited = recording.waited[f"/chat/{i}"]
        assert waited >= i * share - share / 2, (i, waited)
    # then each goes on at once: many exchanges each, not one per spread
    assert recording.requests > 10 * CLIENTS
