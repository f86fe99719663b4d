"""One benchmark run, start to end: servers up, each measurement in turn, servers down.

Order of a run (each server a process of its own, one uvicorn worker):

    throwaway PostgreSQL and Redis        for the whole run (each skipped if not installed)
    floor, chatmeter on SQLite, on PostgreSQL, on SQLite + Redis    started together, warmed up
    one exchange at a time        floor / chatmeter, alternating rounds
    50 concurrent, no delay       floor / SQLite / PostgreSQL / SQLite + Redis, alternating
    50 concurrent, paced model    floor / chatmeter, alternating rounds: clients spread
                                  over a reply's second, then all in step
    concurrency sweep             floor / chatmeter at each level (the plot)
    count-token calls             a clean batch of complete exchanges, /metrics before/after
    SQL statements per exchange   chatmeter in this process, SQLite and PostgreSQL
    stop latency                  two servers on one database, stop posted to the other:
                                  PostgreSQL (NOTIFY), PostgreSQL + Redis, SQLite (poll)
    local model                   chatmeter / llama.cpp's own server, alternating
    held replies                  a fresh chatmeter and a control: RSS around N exchanges
    open streams                  a fresh chatmeter; waves of slow streams
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import uvloop

from chatmeter.db.migrate import upgrade
from tools.bench.harness import (
    INSTANT,
    LOCAL_MAX_TOKENS,
    PACED,
    SLOW,
    Bench,
    BenchOptions,
    Progress,
    alternate,
    wait_idle,
)
from tools.bench.held_replies import measure_held_replies
from tools.bench.load import BENCH_MESSAGE, LoadResult, Slot, run_wrk, wrk_path
from tools.bench.local import measure_local_model
from tools.bench.machine import this_machine
from tools.bench.open_streams import measure_open_streams
from tools.bench.postgres import ThrowawayPostgres, postgres_available
from tools.bench.processes import ServerProcess, raise_open_files_limit
from tools.bench.redis_server import ThrowawayRedis, redis_available
from tools.bench.results import BenchResults, Comparison, SweepPoint
from tools.bench.statements import count_postgres, count_sqlite
from tools.bench.stop_latency import measure_stop_latency
from tools.bench.streams import run_stream


def count_token_calls(
    server: ServerProcess, slots: list[Slot], exchanges: int
) -> tuple[float, int]:
    """Count-token calls per complete exchange, from /metrics around a clean batch (the
    cut-off streams at the end of each wrk run are metered by counting, rightly)."""

    def counters() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        calls = complete = 0.0
        for line in text.splitlines():
            if line.startswith("chatmeter_count_token_calls_total "):
                calls = float(line.split()[-1])
            elif line.startswith("chatmeter_exchanges_total{") and 'status="complete"' in line:
                complete += float(line.split()[-1])
        return calls, complete

    async def batch() -> int:
        done = 0
        for _ in range(max(1, exchanges // len(slots))):
            records = await asyncio.gather(
                *(run_stream(server.url, slot, BENCH_MESSAGE, 60) for slot in slots)
            )
            done += sum(r.ok for r in records)
        return done

    calls_before, complete_before = counters()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(batch())
    calls_after, complete_after = counters()
    complete = int(complete_after - complete_before)
    return ((calls_after - calls_before) / complete if complete else float("nan"), complete)


def measure_scripted(
    bench: Bench, results: BenchResults, postgres_url: str | None, redis_url: str | None
) -> ServerProcess:
    """Every figure of the scripted model; returns the SQLite chatmeter, still running."""
    options = bench.options
    say = bench.say
    floor = bench.start_floor()
    sqlite = bench.start_chatmeter("chatmeter", bench.sqlite_url("chatmeter"))
    pg = bench.start_chatmeter("chatmeter-pg", postgres_url) if postgres_url else None
    with_redis = None
    if redis_url:
        with_redis = bench.start_chatmeter(
            "chatmeter-redis",
            bench.sqlite_url("chatmeter-redis"),
            {"CHATMETER_REDIS_URL": redis_url},
        )
    full_plan = bench.start_chatmeter(
        "chatmeter-plan", bench.sqlite_url("chatmeter-plan"), {"CHATMETER_DEFAULT_PLAN": "full"}
    )
    say("servers up; making clients (one user and one chat each)")
    levels, sweep_seconds = options.sweep
    most = max(*levels, 50)
    slots = {
        "floor": bench.slots(floor, "bench", most),
        "chatmeter": bench.slots(sqlite, "bench", most),
    }
    paced_slots = {
        "floor": bench.slots(floor, "paced", 50),
        "chatmeter": bench.slots(sqlite, "paced", 50),
    }
    slots["chatmeter-plan"] = bench.slots(full_plan, "bench", 50)
    if pg is not None:
        slots["chatmeter-pg"] = bench.slots(pg, "bench", 50)
    if with_redis is not None:
        slots["chatmeter-redis"] = bench.slots(with_redis, "bench", 50)
    servers = {
        "floor": floor,
        "chatmeter": sqlite,
        "chatmeter-pg": pg,
        "chatmeter-redis": with_redis,
        "chatmeter-plan": full_plan,
    }

    for name, target_slots in slots.items():
        server = servers[name]
        assert server is not None
        say(f"warming up {name}")
        run_wrk(server, target_slots[:50], seconds=2, workdir=bench.workdir)

    rounds, seconds = options.latency_rounds
    one = {"floor": (floor, slots["floor"][:1]), "chatmeter": (sqlite, slots["chatmeter"][:1])}
    if pg is not None:
        one["chatmeter-pg"] = (pg, slots["chatmeter-pg"][:1])
    results.one_at_a_time = Comparison(
        INSTANT, 1, alternate(bench, one, rounds, seconds, "one exchange at a time")
    )

    rounds, seconds = options.throughput_rounds
    many: dict[str, tuple[ServerProcess, list[Slot]]] = {
        "floor": (floor, slots["floor"][:50]),
        "chatmeter": (sqlite, slots["chatmeter"][:50]),
    }
    if pg is not None:
        many["chatmeter-pg"] = (pg, slots["chatmeter-pg"][:50])
    if with_redis is not None:
        many["chatmeter-redis"] = (with_redis, slots["chatmeter-redis"][:50])
    many["chatmeter-plan"] = (full_plan, slots["chatmeter-plan"][:50])
    results.throughput = Comparison(
        INSTANT, 50, alternate(bench, many, rounds, seconds, "50 concurrent")
    )

    rounds, seconds = options.paced_rounds
    paced = {
        "floor": (floor, paced_slots["floor"]),
        "chatmeter": (sqlite, paced_slots["chatmeter"]),
    }
    # 50 users do not arrive together: the clients' first requests spread over one reply's
    # time, and replies that all take that time keep them spread (the bar's figure)
    spread = PACED.chunks * PACED.delay_ms / 1000
    results.paced = Comparison(
        PACED,
        50,
        alternate(bench, paced, rounds, seconds, "50 concurrent, paced model", spread),
        spread,
    )
    # and all at once, in step: 50 openings, then 50 settlements, queue together each second
    results.paced_in_step = Comparison(
        PACED, 50, alternate(bench, paced, rounds, seconds, "50 concurrent, paced, in step")
    )

    for level in levels:
        point: dict[str, LoadResult] = {}
        for name in ("floor", "chatmeter"):
            server = servers[name]
            assert server is not None
            wait_idle(server)
            say(f"concurrency sweep: {level} clients, {name}")
            point[name] = run_wrk(
                server, slots[name][:level], seconds=sweep_seconds, workdir=bench.workdir
            )
        results.sweep.append(SweepPoint(level, point["floor"], point["chatmeter"]))

    say("count-token calls per exchange")
    wait_idle(sqlite)
    calls, complete = count_token_calls(
        sqlite, slots["chatmeter"][:50], 200 if options.quick else 500
    )
    results.count_calls_per_exchange, results.count_exchanges = calls, complete

    floor.stop()
    for other in (pg, with_redis):
        if other is not None:
            other.stop()
    return sqlite


def measure_stops(
    bench: Bench, results: BenchResults, postgres_url: str | None, redis_url: str | None
) -> None:
    """Stop latency across two servers: each shared bus there is, and SQLite's poll."""
    variants: list[tuple[str, str, str, str | None, bool]] = []
    if postgres_url:
        variants.append(("PostgreSQL, LISTEN/NOTIFY", "stop-pg", postgres_url, None, True))
        if redis_url:
            variants.append(
                ("PostgreSQL + Redis pub/sub", "stop-redis", postgres_url, redis_url, True)
            )
    else:
        results.skipped["stop latency, PostgreSQL"] = results.skipped.get(
            "postgres", "no PostgreSQL"
        )
    variants.append(("SQLite, poll only", "stop-sqlite", bench.sqlite_url("stops"), None, False))
    for variant, name, database_url, redis, bus in variants:
        results.stop_latency.append(
            measure_stop_latency(bench, variant, name, database_url, redis, bus)
        )


@contextlib.contextmanager
def throwaway_redis(bench: Bench, results: BenchResults) -> Iterator[str | None]:
    if not bench.options.redis:
        results.skipped["redis"] = "--no-redis"
        yield None
        return
    if not redis_available():
        results.skipped["redis"] = "redis-server is not installed"
        yield None
        return
    server = ThrowawayRedis()
    bench.say("starting a throwaway Redis")
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


@contextlib.contextmanager
def throwaway_postgres(bench: Bench, results: BenchResults) -> Iterator[str | None]:
    if not bench.options.postgres:
        results.skipped["postgres"] = "--no-postgres"
        yield None
        return
    if not postgres_available():
        results.skipped["postgres"] = "PostgreSQL 15 server binaries are not installed"
        yield None
        return
    server = ThrowawayPostgres()
    bench.say("starting a throwaway PostgreSQL")
    server.start()
    try:
        yield server.url()
    finally:
        server.stop()


def wrk_version() -> str:
    done = subprocess.run([wrk_path(), "-v"], capture_output=True, text=True)
    return (done.stdout or done.stderr).splitlines()[0].split(" [")[0]


def run_bench(options: BenchOptions, command: str, progress: Progress) -> BenchResults:
    """Run every measurement; the servers and the run's folder are gone afterwards.
    `command`: how it was started, for the report."""
    soft, _ = raise_open_files_limit()
    results = BenchResults(
        machine=this_machine(),
        command=command,
        started=datetime.now(UTC),
        quick=options.quick,
        wrk_version=wrk_version(),
        open_files_limit=soft,
    )
    workdir = Path(tempfile.mkdtemp(prefix="chatmeter-bench-"))
    bench = Bench(options, workdir, progress)
    try:
        with (
            throwaway_postgres(bench, results) as postgres_url,
            throwaway_redis(bench, results) as redis_url,
        ):
            chatmeter = measure_scripted(bench, results, postgres_url, redis_url)
            progress("SQL statements per exchange")
            fresh = bench.sqlite_url("statements")
            upgrade(fresh)
            results.statements.append(count_sqlite(bench.config, fresh))
            if postgres_url:
                results.statements.append(count_postgres(bench.config, postgres_url))
            measure_stops(bench, results, postgres_url, redis_url)
        if options.local_model:
            results.local_model = measure_local_model(bench, chatmeter, LOCAL_MAX_TOKENS)
        else:
            results.skipped["local model"] = "--no-local"
        chatmeter.stop()

        results.held_replies = measure_held_replies(bench, options.held_replies)
        results.open_streams = measure_open_streams(bench, SLOW, options.streams)
    except BaseException:
        for server in bench.servers:
            if server.process.poll() is not None:
                sys.stderr.write(f"--- {server.name} log ---\n{server.log_tail()}\n")
        raise
    finally:
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    results.finished = datetime.now(UTC)
    return results
