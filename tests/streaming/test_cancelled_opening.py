"""A message request cancelled while its opening was out (the client's request ended
by a shutdown, or any cancellation of the task that asked): the opening may have
committed, with nobody left to stream or settle it. It must not hold the chat (409)
and the user's budget until its lease runs out, nor leave its user message behind."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chatmeter.auth.tokens import Principal
from chatmeter.db.transactor import SqliteTransactor, Transactor
from chatmeter.streaming.exchange import open_exchange, open_prompt_exchange
from chatmeter.streaming.opening import Prompt
from tests.conftest import auth, make_settings, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import chat_rows, open_reservations
from tests.support.postgres import PostgresServer
from tests.support.server import serve
from tests.support.sse import stream_message
from tests.support.waiting import eventually
from tests.support.writer_faults import hold_the_answer_to_the_next_batch, nothing


async def answer_held(
    transactor: Transactor, tmp_path: Path
) -> tuple[asyncio.Future[tuple[None, Any, Any]], Path, Path]:
    """The SQLite writer holds its next batch: the next transaction sent commits (the
    file `committed` appears) and is answered once `release` is touched; the returned
    future ends with the held batch."""
    holding, committed, release = (tmp_path / n for n in ("holding", "committed", "go"))
    armed = asyncio.gather(
        transactor.run(
            hold_the_answer_to_the_next_batch, str(holding), str(committed), str(release)
        ),
        transactor.run(nothing),
        transactor.run(nothing),
    )
    await eventually(holding.exists, within=30)
    return armed, committed, release


async def test_an_opening_cancelled_after_its_commit_holds_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = make_settings(sqlite_url, reservation_ttl_seconds=600)
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        services = server.services
        assert isinstance(services.transactor, SqliteTransactor)
        chat_id = await new_chat(client, "cal")
        armed, committed, release = await answer_held(services.transactor, tmp_path)
        asking = asyncio.ensure_future(
            open_exchange(services, Principal("cal"), uuid.UUID(chat_id), "hello")
        )
        await eventually(committed.exists, within=30)  # committed; its answer is held
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        release.touch()
        await asyncio.wait_for(armed, 30)

        async def nothing_held() -> bool:
            return await open_reservations(server.engine, "cal") == 0

        await eventually(nothing_held, within=15)  # not held until the lease runs out
        assert await chat_rows(server.engine, chat_id) == []  # its user message taken back
        again = await stream_message(client, chat_id, "hello again", token_for("cal"))
        assert again.status == 200, again.body
        assert again.last.get("done") is True


# the row another transaction holds while the opening's statement waits for it: the
# user's, or the chat's (a delete's lock), which the opening waits for before it takes
# the user's row: an undo run at once would find the user's row free and nothing to take
# back, and the opening would commit after it
HELD_ROWS = {
    "user": "SELECT 1 FROM user_usage WHERE user_id = 'cy' FOR UPDATE",
    "chat": "SELECT 1 FROM chats WHERE chat_id = $1 FOR UPDATE",
}


@pytest.mark.parametrize("held", sorted(HELD_ROWS))
async def test_an_opening_cancelled_while_postgres_runs_it_holds_nothing(
    postgres: PostgresServer, postgres_template: str, held: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the opening's statement waits for a row another transaction holds; its caller is
    # cancelled meanwhile, and the statement commits once the row is free
    caplog.set_level(logging.INFO, "chatmeter.exchange")
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    url = postgres.url(name)
    async with serve(make_settings(url, reservation_ttl_seconds=600)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "cy")
            assert (await client.get("/api/usage", headers=auth("cy"))).status_code == 200
            holder = await asyncpg.connect(url.replace("+asyncpg", "", 1))
            try:
                holding = holder.transaction()
                await holding.start()
                lock = HELD_ROWS[held]
                await holder.execute(lock, *([uuid.UUID(chat_id)] if "$1" in lock else []))
                asking = asyncio.ensure_future(
                    open_exchange(server.services, Principal("cy"), uuid.UUID(chat_id), "hi")
                )

                async def the_opening_waits() -> bool:
                    # `holder`'s transaction sees pg_stat_activity as at its first look
                    await holder.execute("SELECT pg_stat_clear_snapshot()")
                    waiting = await holder.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                        name,
                    )
                    return bool(waiting)

                await eventually(the_opening_waits, within=30)

                async def user_row_version() -> object:
                    # a new snapshot for each statement (read committed)
                    return await holder.fetchval(
                        "SELECT xmin::text FROM user_usage WHERE user_id = 'cy'"
                    )

                version = await user_row_version()
                asking.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asking

                async def the_undo_ran_or_waits() -> bool:
                    if "taken back once it ends" in caplog.text:
                        return True  # it waits for the opening in the server
                    if await user_row_version() != version:
                        return True  # it ran: it writes the user's row first
                    # or it waits in PostgreSQL, behind the opening
                    await holder.execute("SELECT pg_stat_clear_snapshot()")
                    waiting = await holder.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                        name,
                    )
                    return bool(waiting >= 2)

                # the row is let go only once the undo has had its chance to run first
                await eventually(the_undo_ran_or_waits, within=30)
                await holding.rollback()
            finally:
                await holder.close()

            async def nothing_held() -> bool:
                return await open_reservations(server.engine, "cy") == 0

            await eventually(nothing_held, within=15)
            assert await chat_rows(server.engine, chat_id) == []
            again = await stream_message(client, chat_id, "hello again", token_for("cy"))
            assert again.status == 200, again.body


async def test_a_completion_opening_cancelled_after_its_commit_holds_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    # the OpenAI-compatible endpoint's opening: its reservation holds the user's budget
    settings = make_settings(sqlite_url, reservation_ttl_seconds=600)
    async with serve(settings) as server:
        services = server.services
        armed, committed, release = await answer_held(services.transactor, tmp_path)
        prompt = Prompt("scripted", None, (), "hello", None)
        asking = asyncio.ensure_future(open_prompt_exchange(services, Principal("cid"), prompt))
        await eventually(committed.exists, within=30)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        release.touch()
        await asyncio.wait_for(armed, 30)

        async def nothing_held() -> bool:
            return await open_reservations(server.engine, "cid") == 0

        await eventually(nothing_held, within=15)
