"""The randomized reliability trial of issue 7, reusable by pytest and `make soak`.

chatmeter runs as a real 2-worker process on PostgreSQL against the loopback Gemini
server. Trials (plan.py) run with bounded concurrency, each chat used by one trial at a
time; each trial completes, or the client leaves, or stops it on a fresh connection, or
the upstream drops or refuses with a 429, or reports no usage. When the system is quiet
the database is audited (audit.py) and the figures reported (report.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.engine import make_engine
from chatmeter.db.tables import reservations, user_usage
from tests.conftest import TEST_SECRET, token_for
from tests.fakes.gemini_server import GeminiScript, GeminiServer, ReceivedRequest, StreamRecord
from tests.fakes.gemini_server import running_gemini_server as running_gemini
from tests.support.process import chatmeter_process
from tests.support.sse import StreamResult, is_piece, parse_events
from tools.soak.audit import audit
from tools.soak.plan import (
    HISTORY_MESSAGES,
    LEAVES,
    STOPS,
    SYSTEM_PROMPT,
    SoakConfig,
    TrialPlan,
    TrialResult,
    plan_trials,
    trial_of,
)
from tools.soak.report import Report, figures

TOML = """
default_model = "gemini"
default_token_limit = 1000000000
provider_idle_timeout_seconds = 20.0
system_prompt = "{system_prompt}"
history_messages = {history}

[models.gemini]
provider = "gemini"
model = "gemini-2.5-flash"
api_key_env = "GEMINI_TEST_KEY"
base_url = "{base_url}"
timeout_seconds = 20
max_output_tokens = 256
context_window = 1000000
"""
TRIAL_TIMEOUT = 60.0  # one exchange, end to end
SETTLE_TIMEOUT = 30.0  # a reply the client left, until its reservation is gone
QUIET_TIMEOUT = 60.0  # the whole system, after the last trial


@dataclass(slots=True)
class ChatSlot:
    user_id: str
    chat_id: str


class Scripts:
    """The fake Gemini's script for each request, found by the trial its message names."""

    def __init__(self, plans: list[TrialPlan]) -> None:
        self._scripts = {plan.index: plan.script() for plan in plans}

    def __call__(self, request: ReceivedRequest) -> GeminiScript:
        index = trial_of(request)
        return self._scripts[index] if index is not None else GeminiScript()


class Driver:
    def __init__(self, url: str, engine: AsyncEngine, config: SoakConfig) -> None:
        self.url = url
        self.engine = engine
        self.config = config
        self.loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=config.concurrency * 2)
        self.client = httpx.AsyncClient(base_url=url, timeout=30, limits=limits)
        # which chat a trial gets depends on timing; what each trial does, on the seed only
        self.chooser = random.Random(config.seed ^ 0x5EED)

    async def setup(self) -> list[ChatSlot]:
        slots = []
        for u in range(self.config.users):
            user = f"soak-user-{u:02d}"
            for c in range(self.config.chats_per_user):
                response = await self.client.post(
                    "/api/chat", json={"title": f"soak {u}/{c}"}, headers=_auth(user)
                )
                response.raise_for_status()
                slots.append(ChatSlot(user, str(response.json()["chat_id"])))
        return slots

    async def run(self, plans: list[TrialPlan], slots: list[ChatSlot]) -> list[TrialResult]:
        if len(slots) < self.config.concurrency:
            raise ValueError("fewer chats than trials in flight")
        pending = list(reversed(plans))
        free = list(slots)
        results: list[TrialResult] = []
        deadline = self.loop.time() + self.config.time_limit

        async def runner() -> None:
            while pending and self.loop.time() < deadline:
                plan = pending.pop()
                slot = free.pop(self.chooser.randrange(len(free)))
                try:
                    results.append(await self.trial(plan, slot))
                finally:
                    free.append(slot)

        await asyncio.gather(*(runner() for _ in range(self.config.concurrency)))
        return sorted(results, key=lambda r: r.plan.index)

    async def trial(self, plan: TrialPlan, slot: ChatSlot) -> TrialResult:
        result = TrialResult(plan, slot.user_id, slot.chat_id, started=self.loop.time())
        try:
            async with asyncio.timeout(TRIAL_TIMEOUT):
                await self._exchange(plan, slot, result)
        except Exception as exc:  # a client-side failure is a finding, not a crash
            result.error = f"{type(exc).__name__}: {exc}"
        result.ended = self.loop.time()
        # a reply whose client left settles on its own; the chat is reused only then
        if result.final is None and await self._reservation_gone(slot.chat_id, SETTLE_TIMEOUT):
            result.settled = self.loop.time()
        return result

    async def _exchange(self, plan: TrialPlan, slot: ChatSlot, result: TrialResult) -> None:
        url = f"/api/chat/{slot.chat_id}/message"
        body = {"message": plan.message}
        async with self.client.stream(
            "POST", url, json=body, headers=_auth(slot.user_id)
        ) as response:
            result.status_code = response.status_code
            if response.status_code != 200:
                await response.aread()
                result.body = response.json()
                return
            stream = StreamResult(response.status_code, response.headers, events=result.events)
            if await self._fault(plan, slot, result):
                return  # leaving the block closes the connection mid-stream
            async for event in parse_events(response.aiter_lines(), stream):
                if event.get("done") or event.get("error"):
                    return
                if not is_piece(event):
                    continue  # the first event names the reply
                if result.first_chunk is None:
                    result.first_chunk = self.loop.time()
                if await self._fault(plan, slot, result):
                    return

    async def _fault(self, plan: TrialPlan, slot: ChatSlot, result: TrialResult) -> bool:
        """The client's part of the trial, once it has read `after` chunks: leave (True)
        or send a stop."""
        if len(result.chunks) != plan.after or result.stop_sent is not None:
            return False
        if plan.kind in LEAVES:
            result.left = True
            return True
        if plan.kind in STOPS:
            result.stop_sent = self.loop.time()
            result.stop_status = await self._stop(slot)
            result.stop_answered = self.loop.time()
        return False

    async def _stop(self, slot: ChatSlot) -> int:
        # a fresh connection: the kernel may hand it to the worker not holding the stream
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as fresh:
            response = await fresh.post(
                f"/api/chat/{slot.chat_id}/stop", headers=_auth(slot.user_id)
            )
        return response.status_code

    async def _reservation_gone(self, chat_id: str, within: float) -> bool:
        deadline = self.loop.time() + within
        query = sa.select(sa.func.count()).where(reservations.c.chat_id == uuid.UUID(chat_id))
        while self.loop.time() < deadline:
            async with self.engine.connect() as conn:
                if (await conn.execute(query)).scalar_one() == 0:
                    return True
            await asyncio.sleep(0.02)
        return False

    async def wait_quiet(self, within: float = QUIET_TIMEOUT) -> float | None:
        """Seconds until nothing is reserved anywhere, or None if that never came."""
        start = self.loop.time()
        while self.loop.time() - start < within:
            async with self.engine.connect() as conn:
                rows = await conn.execute(sa.select(sa.func.count()).select_from(reservations))
                held = await conn.execute(sa.select(sa.func.sum(user_usage.c.reserved_tokens)))
                if rows.scalar_one() == 0 and not held.scalar_one():
                    return self.loop.time() - start
            await asyncio.sleep(0.05)
        return None

    async def aclose(self) -> None:
        await self.client.aclose()


def _auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user)}"}


@contextmanager
def _gemini_key() -> Iterator[None]:
    # the fake ignores the key; the SDK wants one, and the server process reads it
    previous = os.environ.get("GEMINI_TEST_KEY")
    os.environ["GEMINI_TEST_KEY"] = "soak-key"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GEMINI_TEST_KEY", None)
        else:
            os.environ["GEMINI_TEST_KEY"] = previous


async def run_soak(
    database_url: str, work_dir: Path, config: SoakConfig, *, command: str = ""
) -> Report:
    """Run the whole trial against a fresh, migrated PostgreSQL database; audit; report."""
    plans = plan_trials(config.seed, config.trials)
    began = time.time()
    engine = make_engine(database_url)
    try:
        with _gemini_key(), running_gemini() as gemini:
            gemini.script_for = Scripts(plans)
            with chatmeter_process(
                database_url,
                TEST_SECRET,
                TOML.format(
                    base_url=gemini.url, system_prompt=SYSTEM_PROMPT, history=HISTORY_MESSAGES
                ),
                work_dir,
                workers=config.workers,
                # the trial's disconnects are those of the stop-on-disconnect policy; the
                # default (the reply goes on) is tested in tests/streaming/test_resume.py
                extra_env={"GEMINI_TEST_KEY": "soak-key", "CHATMETER_ON_DISCONNECT": "stop"},
            ) as url:
                driver = Driver(url, engine, config)
                try:
                    slots = await driver.setup()
                    phase_start = driver.loop.time()
                    results = await driver.run(plans, slots)
                    phase = driver.loop.time() - phase_start
                    quiet = await driver.wait_quiet()
                finally:
                    await driver.aclose()
                upstream = _streams_by_trial(gemini)
                await asyncio.to_thread(dump, results, upstream, work_dir / "trials.jsonl")
                outcome = await audit(engine, plans, results, upstream, work_dir / "outbox", quiet)
        async with engine.connect() as conn:
            version = (await conn.execute(sa.text("SHOW server_version"))).scalar_one()
        return figures(
            config,
            results,
            outcome,
            phase_seconds=phase,
            quiet_seconds=quiet,
            began=began,
            duration=time.time() - began,
            database=str(version),
            command=command,
            server_log=work_dir / "server.log",
        )
    finally:
        await engine.dispose()


def dump(results: list[TrialResult], upstream: dict[int, list[StreamRecord]], path: Path) -> None:
    """One line per trial, times in seconds from its start: for finding out what happened."""
    with path.open("w") as handle:
        for r in results:
            records = upstream.get(r.plan.index, [])

            def since(moment: float | None, start: float = r.started) -> float | None:
                return None if moment is None else round(moment - start, 4)

            line = {
                "plan": asdict(r.plan),
                "chat_id": r.chat_id,
                "user_id": r.user_id,
                "status_code": r.status_code,
                "chunks": len(r.chunks),
                "final": r.final,
                "left": r.left,
                "error": r.error,
                "stop_status": r.stop_status,
                "first_chunk": since(r.first_chunk),
                "stop_sent": since(r.stop_sent),
                "stop_answered": since(r.stop_answered),
                "ended": since(r.ended),
                "settled": since(r.settled),
                "upstream_sent": [rec.sent for rec in records],
                "upstream_completed": [rec.completed for rec in records],
            }
            handle.write(json.dumps(line) + "\n")


def _streams_by_trial(gemini: GeminiServer) -> dict[int, list[StreamRecord]]:
    streams: dict[int, list[StreamRecord]] = {}
    for record in gemini.streams:
        index = trial_of(record.request)
        if index is not None:
            streams.setdefault(index, []).append(record)
    return streams
