"""A stop posted to one worker while another streams the reply (SPEC section 11: ends
within 100 ms on whichever worker holds it).

Two single-worker chatmeter servers share one database (what two hosts are:
`chatmeter serve --workers 2` puts both workers behind one port, so a client cannot pick
the worker). A slow scripted reply streams from A; once its first piece has arrived the
stop goes to B; the latency runs from sending the stop to the end event
(`finish_reason` "stopped") arriving on A's stream. Trials run one at a time, each in a
chat of its own; the stop goes after 1 to 10 pieces in turn (50 to 500 ms into the reply),
so that trials following one another do not fall in step with a worker's 0.5 s poll."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import uvloop

from tools.bench.harness import Bench
from tools.bench.load import BENCH_MESSAGE, Slot
from tools.bench.processes import ServerProcess
from tools.bench.results import StopLatency

STOPPABLE_MODEL = "stoppable"
WARM_UP_TRIALS = 2
PIECES_BEFORE_STOP = 10  # the stop follows piece 1, 2, … 10, 1, 2 … in turn
TRIAL_TIMEOUT_SECONDS = 30.0


class TrialFailed(Exception):
    pass


async def _trial(
    on_a: httpx.AsyncClient, on_b: httpx.AsyncClient, slot: Slot, stop_after: int
) -> tuple[float, float]:
    """One stop, sent after `stop_after` pieces: (latency, the stop request's own answer
    time), in ms."""
    headers = {"Authorization": f"Bearer {slot.token}"}
    stop: asyncio.Task[tuple[httpx.Response, float]] | None = None
    sent_at = 0.0

    async def send_stop() -> tuple[httpx.Response, float]:
        answer = await on_b.post(f"/api/chat/{slot.chat_id}/stop", headers=headers)
        return answer, time.perf_counter()

    end: dict[str, object] | None = None
    ended_at = 0.0
    pieces = 0
    try:
        async with on_a.stream(
            "POST", slot.path, json={"message": BENCH_MESSAGE}, headers=headers
        ) as response:
            if response.status_code != 200:
                raise TrialFailed(f"HTTP {response.status_code} from the generating worker")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = orjson.loads(line[5:])
                if event.get("done") or event.get("error"):
                    ended_at = time.perf_counter()
                    end = event
                    break
                if event.get("chunk"):
                    pieces += 1
                    if stop is None and pieces >= stop_after:
                        sent_at = time.perf_counter()
                        stop = asyncio.create_task(send_stop())
    finally:
        if stop is not None and end is None:
            stop.cancel()  # the stream failed: the trial with it
    if stop is None:
        raise TrialFailed(f"the reply ended after {pieces} pieces, before the stop")
    if end is None:
        raise TrialFailed("the stream ended without an end event")
    answer, answered_at = await stop
    if answer.status_code != 202:
        raise TrialFailed(f"the stop was answered {answer.status_code}: {answer.text[:80]}")
    if end.get("finish_reason") != "stopped":
        raise TrialFailed(f"the reply ended {end.get('finish_reason')!r} after {pieces} pieces")
    return (ended_at - sent_at) * 1000, (answered_at - sent_at) * 1000


async def _trials(
    a: ServerProcess, b: ServerProcess, slots: list[Slot], result: StopLatency
) -> None:
    timeout = httpx.Timeout(TRIAL_TIMEOUT_SECONDS)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=timeout) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=timeout) as on_b,
    ):
        for index, slot in enumerate(slots):
            try:
                async with asyncio.timeout(TRIAL_TIMEOUT_SECONDS):
                    stop_after = 1 + index % PIECES_BEFORE_STOP
                    latency, answer = await _trial(on_a, on_b, slot, stop_after)
            except (TrialFailed, TimeoutError, httpx.HTTPError) as exc:
                result.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if index >= WARM_UP_TRIALS:
                result.latencies_ms.append(latency)
                result.answer_ms.append(answer)


def measure_stop_latency(
    bench: Bench,
    variant: str,
    name: str,
    database_url: str,
    redis_url: str | None,
    bus: bool,
) -> StopLatency:
    """Two servers `name`-a and `name`-b on `database_url` (and Redis when given), then
    the trials; both servers are stopped afterwards."""
    settings = {"CHATMETER_REDIS_URL": redis_url} if redis_url else {}
    result = StopLatency(variant, bus, [], [])
    a = bench.start_chatmeter(f"{name}-a", database_url, settings)
    try:
        b = bench.start_chatmeter(f"{name}-b", database_url, settings)
        try:
            trials = bench.options.stop_trials
            bench.say(f"stop latency, {variant}: {trials} stops")
            slots = bench.slots(a, STOPPABLE_MODEL, trials + WARM_UP_TRIALS)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(_trials(a, b, slots, result))
        finally:
            b.stop()
    finally:
        a.stop()
    return result
