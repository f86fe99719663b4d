"""The report names every figure with its bar and a verdict."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tools.bench.load import LoadResult
from tools.bench.machine import Machine
from tools.bench.report import markdown, summary_rows, write_report
from tools.bench.results import (
    BenchResults,
    Comparison,
    HeldMemory,
    HeldReplies,
    Scenario,
    StopLatency,
    SweepPoint,
)

SCENARIO = Scenario(100, 10, 0.0)
MIB = 1024 * 1024


def load(rate: float, p50: float, p99: float, concurrency: int = 50) -> LoadResult:
    return LoadResult(
        concurrency=concurrency,
        seconds=10.0,
        exchanges=int(rate * 10),
        failures=0,
        socket_errors=0,
        p50_ms=p50,
        p90_ms=p99,
        p99_ms=p99,
        mean_ms=p50,
        max_ms=p99,
        client_cpu_seconds=1.0,
        server_cpu_seconds=9.0,
        other_cpu_seconds=0.0,
    )


def results() -> BenchResults:
    machine = Machine("Test CPU", 2, 8.0, "3.11.7", "Linux", (0.1, 0.2, 0.3))
    outcome = BenchResults(machine, "chatmeter bench", datetime.now(UTC), False, "wrk 4", 65536)
    outcome.throughput = Comparison(
        SCENARIO,
        50,
        {
            "floor": [load(1000, 10, 20), load(1000, 10, 20)],
            "chatmeter": [load(700, 11, 25), load(500, 12, 40)],
            # 530 / 600: 11.7 % below the SQLite row
            "chatmeter-redis": [load(560, 11, 25), load(500, 12, 40)],
        },
    )
    outcome.stop_latency = [
        StopLatency("PostgreSQL, LISTEN/NOTIFY", True, [3.0, 5.0, 4.0, 90.0], [2.0, 3.0]),
        StopLatency("PostgreSQL + Redis pub/sub", True, [3.0, 150.0], [2.0]),
        StopLatency("SQLite, poll only", False, [250.0, 480.0, 30.0], [4.0]),
    ]
    outcome.held_replies = HeldReplies(
        390,
        12,
        held=HeldMemory(100 * MIB, 100 * MIB + 2000 * 3000, 2000, 0),
        control=HeldMemory(100 * MIB, 100 * MIB + 2000 * 500, 2000, 0),
    )
    outcome.one_at_a_time = Comparison(
        SCENARIO, 1, {"floor": [load(2000, 0.3, 1, 1)], "chatmeter": [load(400, 1.5, 9, 1)]}
    )
    outcome.sweep = [SweepPoint(1, load(2000, 0.3, 1, 1), load(400, 1.5, 9, 1))]
    outcome.skipped["local model"] = "--no-local"
    outcome.finished = datetime.now(UTC)
    return outcome


def test_each_figure_gets_its_bar_and_verdict() -> None:
    rows = {row.figure: row for row in summary_rows(results())}
    throughput = rows["Throughput at 50 concurrent, SQLite"]
    assert throughput.met is True  # 600 / 1000 = 60 %, the bar exactly
    assert throughput.measured.startswith("60.0%")
    one = rows["Added latency, one exchange at a time (SQLite)"]
    assert one.met is True and "added p50 1.20 ms, p99 8.00 ms" in one.measured
    saturated = rows["Added latency at 50 concurrent, saturated (no delay, SQLite)"]
    assert saturated.met is False  # p99: 32.5 - 20 = 12.5 ms > 10 ms
    assert rows["local model"].met is None


def test_the_markdown_names_machine_command_and_plot(tmp_path: Path) -> None:
    text = markdown(results(), "bench-concurrency.png")
    assert "Test CPU, 2 cores, 8.0 GiB RAM, Python 3.11.7" in text
    assert "`chatmeter bench`" in text
    assert "![throughput and p99 against concurrency](bench-concurrency.png)" in text
    write_report(results(), tmp_path / "benchmarks.md", tmp_path / "bench-concurrency.png")
    assert (tmp_path / "bench-concurrency.png").stat().st_size > 1000


def test_redis_is_measured_against_the_sqlite_row() -> None:
    rows = {row.figure: row for row in summary_rows(results())}
    redis = rows["Throughput at 50 concurrent, SQLite + Redis"]
    assert redis.met is False  # 530 / 600 = 88.3 % of the SQLite row: more than 10 % below
    assert redis.measured.startswith("88.3% of the SQLite row, 53.0% of the floor")
    assert redis.bar.startswith("≥ 90% of the SQLite row")
    outcome = results()
    assert outcome.throughput is not None
    outcome.throughput.rounds["chatmeter-redis"] = [load(560, 11, 25), load(520, 12, 40)]
    rows = {row.figure: row for row in summary_rows(outcome)}
    assert rows["Throughput at 50 concurrent, SQLite + Redis"].met is True  # 540 / 600


def test_stop_latency_has_a_bar_only_where_a_bus_carries_the_stop() -> None:
    rows = {row.figure: row for row in summary_rows(results())}
    notify = rows["Stop latency across workers, PostgreSQL, LISTEN/NOTIFY"]
    assert notify.met is True and notify.bar == "p99 ≤ 100 ms"
    assert notify.measured.startswith("p50 4.00 ms, p99 90.00 ms, max 90.00 ms over 4 stops")
    assert rows["Stop latency across workers, PostgreSQL + Redis pub/sub"].met is False
    poll = rows["Stop latency across workers, SQLite, poll only"]
    assert poll.met is None and "p50 250.00 ms" in poll.measured
    failed = StopLatency("PostgreSQL, LISTEN/NOTIFY", True, [3.0], [2.0], ["TrialFailed: x"])
    assert failed.met is False
    assert StopLatency("PostgreSQL, LISTEN/NOTIFY", True, [], []).met is False


def test_memory_per_held_reply_is_net_of_the_control() -> None:
    outcome = results()
    assert outcome.held_replies is not None
    assert outcome.held_replies.net_per_reply == 2500
    rows = {row.figure: row for row in summary_rows(outcome)}
    held = rows["Memory per held reply (SQLite, in-process log)"]
    assert held.met is None
    assert held.measured.startswith("2,500 B per held reply beyond a server that drops")
    assert "(3,000 B RSS growth per exchange held, 500 B dropped) over 2,000" in held.measured
    assert "390 characters, 12 events" in held.measured


def test_the_markdown_has_the_replies_sections() -> None:
    text = markdown(results(), None)
    assert "### Stop latency across workers" in text
    assert "| SQLite, poll only | 3 | 250.00 ms | 480.00 ms | 480.00 ms | 4.00 ms | 0 |" in text
    assert "### Memory per held reply" in text
    assert "| replies held | 100.0 MiB | 105.7 MiB | 3,000 B | 0 |" in text
    assert "Per held reply: **2,500 B**." in text
    assert "- chatmeter-redis: 530.0 exchanges/s" in text


def test_paced_streams_are_judged_spread_and_reported_in_step() -> None:
    outcome = results()
    outcome.paced = Comparison(
        SCENARIO,
        50,
        {"floor": [load(45, 1003.0, 1008.0)], "chatmeter": [load(45, 1004.0, 1012.0)]},
        spread_seconds=1.0,
    )
    outcome.paced_in_step = Comparison(
        SCENARIO,
        50,
        {"floor": [load(45, 1006.0, 1011.0)], "chatmeter": [load(44, 1016.0, 1030.0)]},
    )
    rows = {row.figure: row for row in summary_rows(outcome)}
    spread = rows["Server overhead at 50 concurrent streams (paced model, SQLite)"]
    assert spread.met is True and "added p50 1.00 ms, p99 4.00 ms" in spread.measured
    in_step = rows["The same 50 streams in step (all 50 requests at once each second)"]
    assert in_step.met is None and in_step.bar == "no bar"
    assert "added p50 10.00 ms" in in_step.measured
    text = markdown(outcome, None)
    assert "their first requests spread over 1 s" in text
    assert "### 50 concurrent streams, paced model, in step" in text
