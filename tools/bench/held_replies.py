"""What a finished reply held for resuming costs in memory (SPEC section 11: a reply's
retained events never exceed its text plus a fixed overhead).

A fresh chatmeter on SQLite answers a warm-up batch, its RSS is read, then N complete
exchanges; their replies stay held for CHATMETER_REPLAY_SECONDS (300 s by default), and
RSS is read again once the server is idle. The same run against a control server that
drops each reply at its end (CHATMETER_REPLAY_SECONDS=0) separates the held replies from
whatever else grows with N (caches, the SQLite writer's pages)."""

from __future__ import annotations

import asyncio

import uvloop

from tools.bench.harness import CHUNKS, REPLY, Bench, wait_idle
from tools.bench.load import BENCH_MESSAGE, Slot
from tools.bench.processes import ServerProcess
from tools.bench.results import HeldMemory, HeldReplies
from tools.bench.streams import run_stream

CHATS = 100
CONCURRENCY = 50
WARM_UP_EXCHANGES = 200


async def _exchanges(server: ServerProcess, slots: list[Slot], count: int) -> int:
    """`count` complete exchanges, `CONCURRENCY` at a time, spread over the chats;
    returns how many failed."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> bool:
        async with limit:
            record = await run_stream(server.url, slots[index % len(slots)], BENCH_MESSAGE, 60)
        return record.ok

    done = await asyncio.gather(*(one(i) for i in range(count)))
    return sum(not ok for ok in done)


def _measure(bench: Bench, name: str, settings: dict[str, str], count: int) -> HeldMemory:
    server = bench.start_chatmeter(name, bench.sqlite_url(name), settings)
    try:
        slots = bench.slots(server, "bench", CHATS)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_exchanges(server, slots, WARM_UP_EXCHANGES))
            wait_idle(server)
            before = server.rss()
            bench.say(f"held replies: {count} exchanges on {name}")
            errors = runner.run(_exchanges(server, slots, count))
        wait_idle(server)
        return HeldMemory(before, server.rss(), count, errors)
    finally:
        server.stop()


def measure_held_replies(bench: Bench, count: int) -> HeldReplies:
    held = _measure(bench, "chatmeter-held", {}, count)
    control = _measure(bench, "chatmeter-unheld", {"CHATMETER_REPLAY_SECONDS": "0"}, count)
    # the first event, the pieces, the end event
    return HeldReplies(len(REPLY), CHUNKS + 2, held, control)
