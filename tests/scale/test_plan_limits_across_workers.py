"""Rate limits hold across worker processes (SPEC section 10): a burst of simultaneous
requests of one user, spread over two workers, never passes `requests_per_minute` nor
`concurrent_replies`, because both are held by the database row the reserve statement
updates."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.conftest import TEST_SECRET, auth, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import balanced, period_books
from tests.support.process import chatmeter_process
from tests.support.sse import StreamResult, stream_message

TOML = """
default_model = "slow"

[models.slow]
provider = "scripted"
reply = "one two three four five six seven eight"
chunks = 8
delay_ms = 100

[plans.burst]
requests_per_minute = 5
period = "day"

[plans.pair]
concurrent_replies = 2
"""


async def _burst(url: str, user: str, count: int) -> list[StreamResult]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as setup:
        chats = [await new_chat(setup, user) for _ in range(count)]

    async def one(chat: str) -> StreamResult:
        # a client (a connection) each: the kernel hands them to either worker
        async with httpx.AsyncClient(base_url=url, timeout=60) as own:
            return await stream_message(own, chat, "Go", token_for(user))

    return list(await asyncio.gather(*(one(chat) for chat in chats)))


async def test_a_burst_across_two_workers_never_passes_either_limit(
    database_url: str, tmp_path: Path
) -> None:
    from chatmeter.db.engine import make_engine

    with chatmeter_process(database_url, TEST_SECRET, TOML, tmp_path, workers=2) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as admin_client:
            admin = auth("root", admin=True)
            for user, plan in (("rhea", "burst"), ("paul", "pair")):
                answer = await admin_client.put(
                    f"/api/admin/users/{user}/plan", json={"plan": plan}, headers=admin
                )
                assert answer.status_code == 200, answer.text
        rated, paired = await asyncio.gather(_burst(url, "rhea", 12), _burst(url, "paul", 10))

    for results, most in ((rated, 5), (paired, 2)):
        served = [r for r in results if r.status == 200]
        refused = [r for r in results if r.status != 200]
        assert 1 <= len(served) <= most, [r.status for r in results]
        assert all(r.last.get("done") is True for r in served)
        for r in refused:
            assert (r.status, r.body["code"]) == (429, "RATE_LIMITED"), r.body
            assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
    # five requests a minute, all at once: exactly the burst passes
    assert len([r for r in rated if r.status == 200]) == 5

    engine = make_engine(database_url)
    try:
        for user in ("rhea", "paul"):
            state = await period_books(engine, user)
            assert balanced(state) and (state.reserved, state.active) == (0, 0)
    finally:
        await engine.dispose()
