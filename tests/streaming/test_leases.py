"""A process renews the leases of the replies it is streaming, and only those: a
reservation whose exchange was lost without settling (say, the answer to the opening
transaction never reached its caller) expires even while the process stays busy."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import httpx

from chatmeter.db.tables import utcnow
from chatmeter.metering.budget import Ask, reserve_budget
from tests.conftest import make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, holds_a_reservation, open_reservations
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message
from tests.support.waiting import eventually

LONG = scripted(reply=" ".join(f"w{i}" for i in range(60)), chunks=60, delay_ms=100)


async def test_only_live_replies_are_renewed(database_url: str) -> None:
    settings = make_settings(database_url, models={"long": LONG}, reservation_ttl_seconds=1.5)
    async with serve(settings) as server:
        services = server.services
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            live_chat = await new_chat(client, "lou", model="long")
            lost_chat = await new_chat(client, "lou", model="long")
            streaming = asyncio.create_task(
                stream_message(client, live_chat, "go", token_for("lou"))
            )
            await eventually(lambda: holds_a_reservation(server.engine, "lou"))
            # a reservation of this worker that no exchange will ever settle
            lost = Ask(
                "lou",
                uuid.UUID(lost_chat),
                10,
                90,
                services.plans,
                Decimal(0),
                services.worker_id,
                1.5,
                utcnow(),
            )
            await services.transactor.run(reserve_budget, lost)
            assert await open_reservations(server.engine, "lou") == 2
            # the live one is renewed past its 1.5 s lease; the lost one is released
            await eventually(lambda: _just_one_left(server, "lou"), within=8, every=0.1)
            assert not streaming.done()  # still streaming, lease renewed (6 s reply)
            result = await streaming
            assert result.last["done"] is True
            state = await books(server.engine, "lou")
            assert state.reserved == 0 and state.total == state.ledger


async def _just_one_left(server: RunningServer, user: str) -> bool:
    return await open_reservations(server.engine, user) == 1
