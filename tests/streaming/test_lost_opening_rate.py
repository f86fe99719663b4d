"""An opening whose outcome was lost (the SQLite writer process died after its commit,
PostgreSQL's answer never came back) is taken back and opened again (`exchange.py`):
the user made one request, and it counts once against `requests_per_minute` (SPEC
section 10), not once for the lost opening and again for the one that streams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from chatmeter.config import PlanConfig
from chatmeter.db.transactor import SqliteTransactor
from tests.conftest import auth, make_settings, token_for
from tests.db.test_sqlite_writer_failures import writer_dying_at_the_next_batch
from tests.streaming.test_exchange import new_chat
from tests.support.outage import opening_answer_lost
from tests.support.postgres import PostgresServer
from tests.support.server import serve
from tests.support.sse import stream_message

ONE_A_MINUTE = {"plans": {"one": PlanConfig(requests_per_minute=1)}, "default_plan": "one"}


async def test_a_message_whose_opening_the_writer_lost_counts_once_against_the_rate(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = make_settings(sqlite_url, reservation_ttl_seconds=600, **ONE_A_MINUTE)
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        transactor = server.services.transactor
        assert isinstance(transactor, SqliteTransactor)
        chat_id = await new_chat(client, "rae")
        first_pid = transactor.pid
        armed = await writer_dying_at_the_next_batch(transactor, tmp_path)
        result = await stream_message(client, chat_id, "hello", token_for("rae"))
        await asyncio.wait_for(armed, 30)
        assert transactor.pid not in (None, first_pid)  # the opening's answer was lost
        assert result.status == 200, result.body
        assert result.last.get("done") is True


async def test_a_message_whose_opening_postgres_never_answered_counts_once_against_the_rate(
    postgres: PostgresServer, postgres_template: str
) -> None:
    async with opening_answer_lost(postgres, postgres_template) as (url, proxy):
        settings = make_settings(url, reservation_ttl_seconds=600, **ONE_A_MINUTE)
        async with serve(settings) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                chat_id = await new_chat(client, "rio")
                assert (await client.get("/api/usage", headers=auth("rio"))).status_code == 200
                result = await stream_message(client, chat_id, "hello", token_for("rio"))
                assert proxy.lost == 1
                assert result.status == 200, result.body
                assert result.last.get("done") is True


async def test_a_completion_whose_opening_the_writer_lost_counts_once_against_the_rate(
    sqlite_url: str, tmp_path: Path
) -> None:
    # the OpenAI-compatible endpoint's opening is taken back the same way
    settings = make_settings(sqlite_url, reservation_ttl_seconds=600, **ONE_A_MINUTE)
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        transactor = server.services.transactor
        assert isinstance(transactor, SqliteTransactor)
        first_pid = transactor.pid
        armed = await writer_dying_at_the_next_batch(transactor, tmp_path)
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hello"}]}
        answered = await client.post(
            "/v1/chat/completions", json=body, headers=auth("ros"), timeout=60
        )
        await asyncio.wait_for(armed, 30)
        assert transactor.pid not in (None, first_pid)
        assert answered.status_code == 200, answered.text
