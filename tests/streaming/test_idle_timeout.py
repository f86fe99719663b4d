"""CHATMETER_PROVIDER_IDLE_TIMEOUT_SECONDS bounds the silence between two pieces, not the
length of a reply: a steady slow reply runs past it, a stalled one ends with
PROVIDER_TIMEOUT, saved and billed, its reservation released."""

from __future__ import annotations

import time

import httpx

from tests.conftest import make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows
from tests.support.server import serve
from tests.support.sse import stream_message

STEADY = scripted(reply="one two three four five six seven eight", chunks=8, delay_ms=150)
STALLED = scripted(reply="never arrives", chunks=1, delay_ms=30_000)


async def test_a_steady_reply_outlasts_the_idle_timeout(database_url: str) -> None:
    settings = make_settings(
        database_url, models={"steady": STEADY}, provider_idle_timeout_seconds=0.5
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "ivy", model="steady")
            began = time.monotonic()
            result = await stream_message(client, chat_id, "go", token_for("ivy"))
            assert time.monotonic() - began > 1.0  # twice the idle timeout, in pieces
            assert result.last["done"] is True
            assert result.text == STEADY.reply


async def test_a_stalled_provider_ends_with_provider_timeout(database_url: str) -> None:
    settings = make_settings(
        database_url, models={"stalled": STALLED}, provider_idle_timeout_seconds=0.5
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "jay", model="stalled")
            began = time.monotonic()
            result = await stream_message(client, chat_id, "go", token_for("jay"))
            assert time.monotonic() - began < 10  # not the provider's 30 s
            end = result.last
            assert end["error"] is True and end["code"] == "PROVIDER_TIMEOUT"
            rows = await chat_rows(server.engine, chat_id)
            assert [(r.role, r.status) for r in rows] == [
                ("user", "complete"),
                ("assistant", "failed"),
            ]
            state = await books(server.engine, "jay")
            # the request reached the provider: its prompt is billed, counted
            assert end["tokens_used"] > 0
            assert state.total == state.ledger == end["tokens_used"]
            assert state.reserved == 0 and state.open_reservations == 0
