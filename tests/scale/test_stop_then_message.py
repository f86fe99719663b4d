"""Stop, then message at once, on two workers (issue 12, break 1): a reply is stopped
after its first chunk while three clients post to the same chat until each is served.
Every answer is 200 or 409 (never a 500 from a lost database race: the settlement of
the stopped reply and the next opening lock the same rows), and the books balance."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx

from chatmeter.db.engine import make_engine
from tests.conftest import TEST_SECRET, auth
from tests.streaming.test_exchange import new_chat
from tests.support.db import books
from tests.support.process import chatmeter_process
from tests.support.sse import StreamResult, parse_events
from tests.support.waiting import eventually

TOML = """
default_model = "slow"

[models.slow]
provider = "scripted"
reply = "{reply}"
chunks = 40
delay_ms = 50
"""
REPLY = " ".join(f"w{i}" for i in range(40))
ROUNDS = 6
CLIENTS = 3


async def message_then_stop(url: str, chat_id: str, user: str, statuses: Counter[int]) -> int:
    """Post until served (each try on a fresh connection, so on either worker); once
    served, stop the reply after its first chunk. Returns the tokens billed."""
    while True:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream(
                "POST", f"/api/chat/{chat_id}/message", json={"message": "m"}, headers=auth(user)
            ) as response:
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    await response.aread()
                    continue
                result = StreamResult(200, response.headers)
                async for event in parse_events(response.aiter_lines(), result):
                    if len(result.chunks) == 1 and not event.get("done"):
                        async with httpx.AsyncClient(base_url=url, timeout=60) as other:
                            stop = await other.post(f"/api/chat/{chat_id}/stop", headers=auth(user))
                            statuses[stop.status_code] += 1
                    if event.get("done") or event.get("error"):
                        break
                assert result.last.get("done") is True, result.last
                return int(result.last["tokens_used"])


async def test_messages_right_after_a_stop_are_never_a_500(
    database_url: str, tmp_path: Path
) -> None:
    statuses: Counter[int] = Counter()
    billed = 0
    with chatmeter_process(database_url, TEST_SECRET, TOML.format(reply=REPLY), tmp_path) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            chat_id = await new_chat(client, "stella")
        for _ in range(ROUNDS):
            billed += await message_then_stop(url, chat_id, "stella", statuses)
            spent = await asyncio.gather(
                *(message_then_stop(url, chat_id, "stella", statuses) for _ in range(CLIENTS))
            )
            billed += sum(spent)
        engine = make_engine(database_url)
        try:

            async def quiet() -> bool:
                state = await books(engine, "stella")
                return state.open_reservations == 0

            await eventually(quiet, within=30)
            state = await books(engine, "stella")
        finally:
            await engine.dispose()
    # 202 a stop, 404 a stop that came after the reply had ended
    assert set(statuses) <= {200, 202, 404, 409}, statuses
    assert statuses[200] == ROUNDS * (1 + CLIENTS)
    assert state.total == state.ledger == billed
    assert state.ledger_rows == ROUNDS * (1 + CLIENTS)
    assert state.reserved == 0
