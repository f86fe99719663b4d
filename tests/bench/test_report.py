"""The report names every figure with its bar and a verdict."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from chatmeter.bench.load import LoadResult
from chatmeter.bench.machine import Machine
from chatmeter.bench.report import markdown, summary_rows, write_report
from chatmeter.bench.results import BenchResults, Comparison, Scenario, SweepPoint

SCENARIO = Scenario(100, 10, 0.0)


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
        },
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
