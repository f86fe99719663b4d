"""Several worker processes on one database: stop reaches whichever worker holds the
stream, the 409 rule holds across them, and a worker killed mid-stream leaves nothing
reserved once its lease runs out (issue 7)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.db.engine import make_engine
from chatmeter.db.tables import reservations
from tests.conftest import TEST_SECRET, auth, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows, holds_a_reservation
from tests.support.process import chatmeter_process
from tests.support.sse import StreamResult, parse_events, stream_message
from tests.support.waiting import eventually

TOML = """
default_model = "slow"
reservation_ttl_seconds = 3.0

[models.slow]
provider = "scripted"
reply = "{reply}"
chunks = 60
delay_ms = 100
"""
REPLY = " ".join(f"w{i}" for i in range(60))


async def holder_pid(database_url: str, chat_id: str) -> int:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            worker = (
                await conn.execute(
                    sa.select(reservations.c.worker_id).where(
                        reservations.c.chat_id == uuid.UUID(chat_id)
                    )
                )
            ).scalar_one()
        return int(worker.split(":")[1])
    finally:
        await engine.dispose()


async def test_stop_and_409_across_workers(database_url: str, tmp_path: Path) -> None:
    with chatmeter_process(database_url, TEST_SECRET, TOML.format(reply=REPLY), tmp_path) as url:
        # separate clients: separate connections, spread over the workers by the kernel
        async with httpx.AsyncClient(base_url=url, timeout=30) as streamer:
            chat_id = await new_chat(streamer, "quinn")
            result = StreamResult(0, httpx.Headers())
            stop_statuses: list[int] = []
            conflicts: list[int] = []
            async with streamer.stream(
                "POST",
                f"/api/chat/{chat_id}/message",
                json={"message": "go"},
                headers=auth("quinn"),
            ) as response:
                async for event in parse_events(response.aiter_lines(), result):
                    if len(result.chunks) == 3 and not stop_statuses:
                        # many fresh connections: some land on the other worker
                        for _ in range(6):
                            async with httpx.AsyncClient(base_url=url, timeout=30) as other:
                                again = await other.post(
                                    f"/api/chat/{chat_id}/message",
                                    json={"message": "x"},
                                    headers=auth("quinn"),
                                )
                                conflicts.append(again.status_code)
                        async with httpx.AsyncClient(base_url=url, timeout=30) as other:
                            stop = await other.post(
                                f"/api/chat/{chat_id}/stop", headers=auth("quinn")
                            )
                            stop_statuses.append(stop.status_code)
                    if event.get("done") or event.get("error"):
                        break
        assert conflicts == [409] * 6
        assert stop_statuses == [202]
        assert result.last["done"] is True and result.last["finish_reason"] == "stopped"
        # stopped well before the 60 pieces (6 s) would have finished
        assert len(result.chunks) < 40
        engine = make_engine(database_url)
        try:
            rows = await chat_rows(engine, chat_id)
            assert [(r.role, r.status) for r in rows] == [
                ("user", "complete"),
                ("assistant", "stopped"),
            ]
            state = await books(engine, "quinn")
            assert state.total == state.ledger == result.last["tokens_used"]
            assert state.reserved == 0 and state.open_reservations == 0
        finally:
            await engine.dispose()


async def test_killed_worker_releases_its_reservation(database_url: str, tmp_path: Path) -> None:
    with chatmeter_process(database_url, TEST_SECRET, TOML.format(reply=REPLY), tmp_path) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            chat_id = await new_chat(client, "ruth")
            streaming = asyncio.create_task(
                stream_message(client, chat_id, "go", token_for("ruth"), stop_after=0)
            )
            engine = make_engine(database_url)
            try:
                await eventually(lambda: holds_a_reservation(engine, "ruth"), within=10)
                pid = await holder_pid(database_url, chat_id)
                assert pid != os.getpid()
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(httpx.HTTPError):  # the connection died with it
                    await streaming
                # the surviving worker's sweeper releases the dead lease (ttl 3 s)
                await eventually(lambda: _released(engine, "ruth"), within=20, every=0.2)
                rows = await chat_rows(engine, chat_id)
                assert [(r.role, r.content) for r in rows] == [("user", "go")]
                state = await books(engine, "ruth")
                assert state.total == state.ledger == 0 and state.ledger_rows == 0
                # the chat is usable again
                async with httpx.AsyncClient(base_url=url, timeout=30) as fresh:
                    again = await stream_message(fresh, chat_id, "again", token_for("ruth"))
                assert again.status == 200 and again.last["done"] is True
                state = await books(engine, "ruth")
                assert state.total == state.ledger == again.last["tokens_used"]
                assert state.reserved == 0
            finally:
                await engine.dispose()


async def _released(engine: AsyncEngine, user: str) -> bool:
    state = await books(engine, user)
    return state.reserved == 0 and state.open_reservations == 0
