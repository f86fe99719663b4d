"""Replaying the outbox (issue 12, code review): a bad line (torn by a crash mid-append,
or a settlement the database refuses for good) becomes a dead letter and replay goes on
with the lines and files after it; a database that is down stops replay with every line
kept; two processes replaying the same directory bill each settlement once. On a real
database, both backends."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.chats.store import insert_chat
from chatmeter.db.transactor import Transactor, make_transactor
from chatmeter.ids import new_id
from chatmeter.metering.outbox import Outbox
from chatmeter.metering.plans import PlanBook
from chatmeter.metering.settlement import Settlement
from chatmeter.observability.metrics import Metrics
from chatmeter.providers.base import Usage
from chatmeter.streaming.opening import ModelLimits, OpeningRules, open_steps
from tests.conftest import make_settings
from tests.support.db import books
from tests.support.outage import DatabaseOutage
from tests.support.waiting import eventually

USER = "rita-outbox"
RULES = OpeningRules(
    models={"m": ModelLimits("Be brief.", context_window=100_000, max_output_tokens=100)},
    history_messages=20,
    plans=PlanBook.of(make_settings("sqlite+aiosqlite://", default_token_limit=1_000_000)),
    worker_id="w-test",
    reservation_ttl_seconds=120.0,
)


async def reply_to_settle(transactor: Transactor, n: int) -> Settlement:
    """A real exchange opened (chat, user message, reservation) and its settlement,
    as the exchange would have spooled it."""
    chat = await transactor.run(insert_chat, USER, f"chat {n}", "m")
    opened = await transactor.run(open_steps, RULES, USER, chat.chat_id, f"hi {n}", None, new_id())
    asked_at = opened.user_message_at
    assert asked_at is not None  # a chat's opening saved the user message
    return Settlement(
        user_id=USER,
        chat_id=chat.chat_id,
        model="m",
        reservation_id=opened.reservation.reservation_id,
        message_id=new_id(),
        content=f"reply {n}",
        status="complete",
        finish_reason="stop",
        usage=Usage(prompt_tokens=10 + n, completion_tokens=5),
        source="provider",
        created_at=asked_at + timedelta(milliseconds=1),
    )


def billed(*settlements: Settlement) -> int:
    return sum(s.usage.total_tokens for s in settlements)


async def test_a_torn_last_line_becomes_a_dead_letter_and_the_rest_is_written(
    audit_engine: AsyncEngine,
    transactor: Transactor,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    outbox = Outbox(str(tmp_path), "w1", metrics)
    first, torn = [await reply_to_settle(transactor, n) for n in (1, 2)]
    outbox.append(first)
    # a crash mid-append: part of a line, no newline
    line = b'{"user_id":"rita-outbox","chat_id":"' + str(torn.chat_id).encode()[:20]
    outbox.path.write_bytes(outbox.path.read_bytes() + line)

    with caplog.at_level(logging.ERROR, logger="chatmeter.outbox"):
        assert await outbox.replay(transactor) == 1

    assert outbox.pending() == 0
    assert outbox.dead_letters() == 1
    assert outbox.path.with_suffix(".dead").read_bytes().startswith(b'{"user_id":"rita-outbox"')
    assert metrics.outbox_dead_letters._value.get() == 1
    assert any("cannot be written" in r.getMessage() for r in caplog.records)
    state = await books(audit_engine, USER)
    assert state.total == state.ledger == billed(first)
    # the torn reply's reservation is left to its lease, as a crash leaves it
    assert state.open_reservations == 1


async def test_a_line_appended_after_a_torn_one_stays_whole(
    audit_engine: AsyncEngine, transactor: Transactor, tmp_path: Path
) -> None:
    outbox = Outbox(str(tmp_path), "w1")
    outbox.directory.mkdir(parents=True, exist_ok=True)
    outbox.path.write_bytes(b'{"user_id":"rita-outb')  # the last process crashed here
    after = await reply_to_settle(transactor, 1)
    outbox.append(after)
    assert await outbox.replay(transactor) == 1
    assert outbox.dead_letters() == 1
    state = await books(audit_engine, USER)
    assert state.total == state.ledger == billed(after) and state.reserved == 0


async def test_a_settlement_refused_for_good_does_not_hold_back_the_others(
    audit_engine: AsyncEngine,
    transactor: Transactor,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chat erased (its rows deleted) while its settlement was spooled: the database
    refuses that settlement for good (its chat is gone); the lines after it, and the
    other process's file, are written."""
    metrics = Metrics()
    mine, other = Outbox(str(tmp_path), "w1", metrics), Outbox(str(tmp_path), "w2", metrics)
    gone, kept, elsewhere = [await reply_to_settle(transactor, n) for n in (1, 2, 3)]
    assert gone.chat_id is not None
    async with audit_engine.begin() as conn:
        for table in ("messages", "chats"):
            await conn.exec_driver_sql(
                f"DELETE FROM {table} WHERE chat_id = '{gone.chat_id.hex}'"
                if audit_engine.dialect.name == "sqlite"
                else f"DELETE FROM {table} WHERE chat_id = '{gone.chat_id}'"
            )
    mine.append(gone)
    mine.append(kept)
    other.append(elsewhere)

    with caplog.at_level(logging.ERROR, logger="chatmeter.outbox"):
        assert await mine.replay(transactor) == 2

    assert mine.pending() == 0 and mine.dead_letters() == 1
    assert metrics.outbox_dead_letters._value.get() == 1
    assert any(str(gone.message_id) in r.getMessage() for r in caplog.records)
    state = await books(audit_engine, USER)
    assert state.total == state.ledger == billed(kept, elsewhere)
    # the two others were released; the gone chat's reservation is left to its lease
    assert state.open_reservations == 1
    # and nothing happens on the next replay
    assert await mine.replay(transactor) == 0
    assert mine.dead_letters() == 1


async def test_a_database_that_is_down_stops_replay_and_keeps_every_line(
    database_url: str, audit_engine: AsyncEngine, tmp_path: Path
) -> None:
    async with DatabaseOutage(database_url) as outage:
        transactor = make_transactor(outage.url, 200)
        await transactor.start()
        try:
            outbox = Outbox(str(tmp_path), "w1")
            spooled = [await reply_to_settle(transactor, n) for n in (1, 2)]
            for s in spooled:
                outbox.append(s)
            outage.begin()
            with pytest.raises(Exception) as raised:
                await outbox.replay(transactor)
            assert not isinstance(raised.value, AssertionError)
            assert outbox.pending() == 2 and outbox.dead_letters() == 0
            outage.end()
            assert await outbox.replay(transactor) == 2
        finally:
            await transactor.close()
    state = await books(audit_engine, USER)
    assert state.total == state.ledger == billed(*spooled) and state.reserved == 0


async def test_two_processes_replaying_the_same_outbox_bill_each_settlement_once(
    database_url: str, audit_engine: AsyncEngine, transactor: Transactor, tmp_path: Path
) -> None:
    directory = tmp_path / "outbox"
    spooled = [await reply_to_settle(transactor, n) for n in range(30)]
    for i, s in enumerate(spooled):
        Outbox(str(directory), f"w{i % 2}").append(s)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    replayers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.metering.replayer",
            database_url,
            str(directory),
            str(go),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    await eventually(lambda: len(list(tmp_path.glob("go.ready*"))) == 2, within=60)
    go.touch()
    outputs = [await asyncio.wait_for(p.communicate(), 120) for p in replayers]
    assert [p.returncode for p in replayers] == [0, 0]
    written = [int(out.decode()) for out, _ in outputs]
    assert sum(written) >= 30  # a line may be written by both: the second writes nothing

    outbox = Outbox(str(directory), "w0")
    assert outbox.pending() == 0 and outbox.dead_letters() == 0
    state = await books(audit_engine, USER)
    assert state.ledger_rows == 30
    assert state.total == state.ledger == billed(*spooled)
    assert state.reserved == 0 and state.open_reservations == 0


async def test_a_figure_no_database_column_holds_is_a_dead_letter_on_both_databases(
    audit_engine: AsyncEngine, transactor: Transactor, tmp_path: Path
) -> None:
    """A settlement whose usage no BIGINT holds (an upstream that reported 2**63 tokens):
    PostgreSQL's driver refuses the value, SQLite's module raises OverflowError; either
    way it can only fail again, so it becomes a dead letter and the line after it is
    written, instead of being taken for a database that is down and holding back every
    line after it for good."""
    outbox = Outbox(str(tmp_path), "w1")
    absurd, kept = [await reply_to_settle(transactor, n) for n in (1, 2)]
    outbox.append(replace(absurd, usage=Usage(prompt_tokens=2**63, completion_tokens=1)))
    outbox.append(kept)
    assert await outbox.replay(transactor) == 1
    assert outbox.pending() == 0 and outbox.dead_letters() == 1
    state = await books(audit_engine, USER)
    assert state.total == state.ledger == billed(kept)
