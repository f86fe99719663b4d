"""The arithmetic behind the figures: percentiles, stream timing, the wrk script."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tools.bench.load import Slot, write_script
from tools.bench.results import percentile
from tools.bench.statements import statement_kind
from tools.bench.streams import (
    StreamRecord,
    _read_events,
    first_piece_lateness_ms,
    peak_concurrency,
    piece_lateness_ms,
)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7


def test_lateness_is_the_gap_beyond_the_scripted_pause() -> None:
    record = StreamRecord(sent_at=10.0, piece_times=[10.7, 11.2, 11.8], ended_at=11.8)
    assert [round(x, 6) for x in piece_lateness_ms([record], 0.5)] == [0.0, 100.0]
    assert [round(x, 6) for x in piece_lateness_ms([record], 0.5, since=11.5)] == [100.0]
    assert [round(x, 6) for x in piece_lateness_ms([record], 0.5, until=11.5)] == [0.0]
    assert [round(x, 6) for x in first_piece_lateness_ms([record], 0.5)] == [200.0]


def test_peak_concurrency_counts_streams_that_streamed_at_once() -> None:
    def record(first: float, closed: float) -> StreamRecord:
        return StreamRecord(sent_at=first - 0.1, piece_times=[first], closed_at=closed)

    records = [record(0, 10), record(1, 2), record(3, 4), record(5, 11)]
    never_started = StreamRecord(sent_at=0.0, closed_at=20.0, error="HTTP 500")
    assert peak_concurrency([*records, never_started]) == 2


def test_wrk_script_gives_each_thread_its_own_chat_and_token(tmp_path: Path) -> None:
    slots = [Slot(f"c{i}", f"/api/chat/c{i}/message", f"token-{i}") for i in range(3)]
    script = tmp_path / "load.lua"
    write_script(script, slots, 'say "hi"')
    text = script.read_text()
    for slot in slots:
        assert f'{{"{slot.path}","{slot.token}"}}' in text
    assert 'thread:set("slot", counter)' in text
    assert '"{\\"message\\": \\"say \\\\\\"hi\\\\\\"\\"}"' in text
    # no spread asked for: no delay hook, so wrk sends every request the moment it can
    assert "function delay" not in text


def test_statement_kinds_name_the_verb_and_the_table() -> None:
    assert statement_kind('INSERT INTO "messages" (a, b) VALUES (?, ?)') == "INSERT messages"
    assert statement_kind("SELECT chats.chat_id FROM chats WHERE x = $1") == "SELECT chats"
    assert statement_kind("UPDATE user_usage SET a = a + 1") == "UPDATE user_usage"
    assert statement_kind("DELETE FROM reservations WHERE id = ?") == "DELETE reservations"
    assert statement_kind("BEGIN IMMEDIATE") == "BEGIN"
    assert statement_kind("END") == "COMMIT"
    assert statement_kind("SAVEPOINT s1") == "SAVEPOINT"


async def test_the_first_event_naming_the_reply_is_not_a_piece() -> None:
    events = [
        b'id: 1\ndata: {"chunk":"","done":false,"message_id":"m","user_message_id":"u"}\n\n',
        b'id: 2\ndata: {"chunk":"A piece","done":false}\n\n',
        b'id: 3\ndata: {"chunk":"","done":true,"finish_reason":"stop"}\n\n',
    ]
    reader = asyncio.StreamReader()
    for event in events:
        reader.feed_data(b"%x\r\n%s\r\n" % (len(event), event))
    reader.feed_data(b"0\r\n\r\n")
    reader.feed_eof()
    record = StreamRecord()
    await _read_events(reader, record)
    assert record.ok and len(record.piece_times) == 1
