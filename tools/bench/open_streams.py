"""Thousands of slow streams open at once on one worker: errors, memory, lateness."""

from __future__ import annotations

import asyncio
import resource
import time

import uvloop

from tools.bench.harness import Bench, wait_idle
from tools.bench.load import BENCH_MESSAGE, Slot
from tools.bench.processes import ServerProcess
from tools.bench.results import OpenStreams, Scenario, StreamWave, percentile
from tools.bench.streams import (
    first_piece_lateness_ms,
    hold_streams,
    peak_concurrency,
    piece_lateness_ms,
)

SLOW_MODEL = "slow"
RSS_SAMPLE_SECONDS = 0.1


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _wave(
    server: ServerProcess, slots: list[Slot], scenario: Scenario, ramp_seconds: float
) -> StreamWave:
    delay = scenario.delay_ms / 1000
    give_up_after = ramp_seconds + scenario.chunks * delay * 3 + 60
    peak = server.rss()
    rss_before = peak

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.rss())
            await asyncio.sleep(RSS_SAMPLE_SECONDS)

    sampler = asyncio.create_task(sample())
    started, client_cpu = time.perf_counter(), _own_cpu_seconds()
    try:
        records = await hold_streams(
            server.url,
            slots,
            message=BENCH_MESSAGE,
            ramp_seconds=ramp_seconds,
            give_up_after=give_up_after,
        )
    finally:
        sampler.cancel()
    seconds = time.perf_counter() - started
    client_cpu = _own_cpu_seconds() - client_cpu
    errors = [r.error or "no end event" for r in records if not r.ok]
    late = piece_lateness_ms(records, delay)
    # the window when every stream is open and none has ended: holding, not opening
    all_started = max((r.piece_times[0] for r in records if r.piece_times), default=0.0)
    first_end = min((r.closed_at for r in records), default=0.0)
    holding = piece_lateness_ms(records, delay, since=all_started, until=first_end)
    first = first_piece_lateness_ms(records, delay)
    return StreamWave(
        streams=len(slots),
        errors=len(errors),
        error_samples=sorted(set(errors))[:5],
        peak_open=peak_concurrency(records),
        rss_before=rss_before,
        rss_peak=peak,
        rss_after=0,
        lateness_p50_ms=percentile(late, 50),
        lateness_p99_ms=percentile(late, 99),
        lateness_max_ms=max(late, default=float("nan")),
        holding_lateness_p99_ms=percentile(holding, 99),
        first_piece_p50_ms=percentile(first, 50),
        first_piece_p99_ms=percentile(first, 99),
        seconds=seconds,
        client_cpu_share=client_cpu / seconds,
    )


def measure_open_streams(bench: Bench, scenario: Scenario, count: int) -> OpenStreams:
    """A fresh chatmeter (its peak memory is this test's alone), `count` users with a chat
    each, then two waves of `count` streams; the second shows whether memory comes back."""
    server = bench.start_chatmeter("chatmeter-streams", bench.sqlite_url("streams"))
    try:
        bench.say(f"open streams: making {count} clients")
        slots = bench.slots(server, SLOW_MODEL, count)
        waves = []
        for index in range(2):
            wait_idle(server)
            bench.say(
                f"open streams: wave {index + 1}/2, {count} streams of "
                f"{scenario.chunks} x {scenario.delay_ms:g} ms"
            )
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                wave = runner.run(_wave(server, slots, scenario, bench.options.stream_ramp_seconds))
            wait_idle(server)
            wave.rss_after = server.rss()
            waves.append(wave)
        return OpenStreams(scenario, waves, server.peak_rss())
    finally:
        server.stop()
