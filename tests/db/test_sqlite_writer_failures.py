"""The SQLite writer process failing (issue 12, code review): one that dies after it
committed an opening and before it answered leaves no stuck chat; one that cannot start
is started again after a backoff, not on every request."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatmeter.db.engine import make_engine
from chatmeter.db.transactor import SqliteTransactor, WriterGone
from tests.conftest import make_settings, token_for
from tests.db.test_sqlite_transactor import db_path, insert, names  # noqa: F401
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows
from tests.support.server import serve
from tests.support.sse import stream_message
from tests.support.waiting import eventually
from tests.support.writer_faults import hold_then_die_answering_the_next_batch, nothing


async def writer_dying_at_the_next_batch(
    transactor: SqliteTransactor, tmp_path: Path
) -> asyncio.Future[Any]:
    """The writer holds a batch: the next transaction sent commits and is never
    answered, the writer dies. The returned future ends with the held batch."""
    marker = tmp_path / "holding"
    armed = asyncio.gather(
        transactor.run(hold_then_die_answering_the_next_batch, str(marker)),
        transactor.run(nothing),
        transactor.run(nothing),
    )
    await eventually(marker.exists, within=30)
    return armed


async def test_an_opening_whose_writer_died_after_commit_leaves_no_stuck_chat(
    sqlite_url: str, tmp_path: Path
) -> None:
    settings = make_settings(sqlite_url, reservation_ttl_seconds=600)
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        transactor = server.services.transactor
        assert isinstance(transactor, SqliteTransactor)
        chat_id = await new_chat(client, "sam")
        first_pid = transactor.pid
        armed = await writer_dying_at_the_next_batch(transactor, tmp_path)
        # the writer holds a batch: this opening goes to it, commits, and is never answered
        result = await stream_message(client, chat_id, "hello", token_for("sam"))
        await asyncio.wait_for(armed, 30)

        assert result.status == 200, result.body
        assert result.last.get("done") is True
        assert transactor.pid not in (None, first_pid)
        rows = await chat_rows(server.engine, chat_id)
        assert [(r.role, r.content) for r in rows][:1] == [("user", "hello")]
        assert [r.role for r in rows] == ["user", "assistant"]  # the lost one taken back
        # the chat is free, and the books balance
        again = await stream_message(client, chat_id, "again", token_for("sam"))
        assert again.status == 200, again.body
    engine = make_engine(sqlite_url)
    try:
        state = await books(engine, "sam")
    finally:
        await engine.dispose()
    assert state.reserved == 0 and state.open_reservations == 0
    assert state.total == state.ledger == result.last["tokens_used"] + again.last["tokens_used"]


async def test_a_completion_whose_writer_died_after_its_opening_committed_holds_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    # the OpenAI-compatible endpoint's opening has no chat and saves no message: what it
    # holds is the user's reservation (budget, a concurrent reply). Lost with the writer
    # after its commit, it must be taken back as a chat's opening is, not held until
    # its lease runs out (a user with one concurrent reply would be 429 meanwhile)
    settings = make_settings(sqlite_url, reservation_ttl_seconds=600)
    async with serve(settings) as server, httpx.AsyncClient(base_url=server.url) as client:
        transactor = server.services.transactor
        assert isinstance(transactor, SqliteTransactor)
        first_pid = transactor.pid
        armed = await writer_dying_at_the_next_batch(transactor, tmp_path)
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hello"}]}
        answered = await client.post(
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {token_for('vic')}"},
            timeout=60,
        )
        await asyncio.wait_for(armed, 30)
        assert answered.status_code == 200, answered.text
        assert transactor.pid not in (None, first_pid)
        billed = answered.json()["usage"]["total_tokens"]
    engine = make_engine(sqlite_url)
    try:
        state = await books(engine, "vic")
    finally:
        await engine.dispose()
    assert state.reserved == 0 and state.open_reservations == 0
    assert state.total == state.ledger == billed and state.ledger_rows == 1


async def test_a_writer_that_cannot_start_is_not_started_on_every_request(
    db_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # its interpreter cannot start
    transactor = SqliteTransactor(f"sqlite+aiosqlite:///{db_path}", 5000, start_backoff_seconds=60)
    try:
        with caplog.at_level(logging.ERROR, logger="chatmeter.db"):
            failures = []
            for _ in range(20):
                with pytest.raises(WriterGone) as gone:
                    await transactor.run(insert, "x")
                failures.append(str(gone.value))
        started = [r for r in caplog.records if "could not start" in r.getMessage()]
        assert len(started) == 1  # one process tried, nineteen requests refused at once
        assert all("next try in" in failure for failure in failures[1:])
    finally:
        await transactor.close()


async def test_a_writer_that_could_not_start_starts_once_it_can(
    db_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")
    transactor = SqliteTransactor(f"sqlite+aiosqlite:///{db_path}", 5000, start_backoff_seconds=0.2)
    try:
        with pytest.raises(WriterGone):
            await transactor.run(insert, "x")
        monkeypatch.delenv("PYTHONHOME")  # the fault is repaired

        async def writes() -> bool:
            try:
                return await transactor.run(insert, "y") == "y"
            except WriterGone:
                return False

        await eventually(writes, within=60, every=0.1)
        assert names(db_path) == {"y"}
    finally:
        await transactor.close()
