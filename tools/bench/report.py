"""The results as a console table, as docs/benchmarks.md and as the concurrency plot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tools.bench.load import LoadResult
from tools.bench.results import (
    ADDED_P50_BAR_MS,
    ADDED_P50_BAR_POSTGRES_MS,
    ADDED_P99_BAR_MS,
    LOCAL_SPEED_BAR,
    MEMORY_GROWTH_ALLOWED,
    OPEN_STREAMS_BAR,
    REPLIES_COST_BAR,
    STOP_LATENCY_BAR_MS,
    THROUGHPUT_BAR,
    THROUGHPUT_BAR_POSTGRES,
    BenchResults,
    Comparison,
    HeldReplies,
    StopLatency,
)

MIB = 1024 * 1024
NOISY_OTHER_CPU = 0.2  # other processes' median CPU (cores) past which a run is noisy


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    measured: str
    bar: str
    met: bool | None  # None: no bar, or not measured

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**not met**", None: "—"}[self.met]


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} ms"


def _added_rows(
    title: str,
    comparison: Comparison | None,
    target: str = "chatmeter",
    p50_bar: float | None = ADDED_P50_BAR_MS,
) -> list[Row]:
    """The added latency of `target`, judged against `p50_bar` (None: reported only)."""
    if comparison is None or target not in comparison.rounds:
        return []
    p50, p99 = comparison.added_p50(target), comparison.added_p99(target)
    measured = (
        f"added p50 {_ms(p50)}, p99 {_ms(p99)} (chatmeter {_ms(comparison.p50(target))} / "
        f"{_ms(comparison.p99(target))}; floor {_ms(comparison.p50('floor'))} / "
        f"{_ms(comparison.p99('floor'))})"
    )
    if p50_bar is None:
        return [Row(title, measured, "no bar", None)]
    bar = f"added p50 ≤ {p50_bar:g} ms, p99 ≤ {ADDED_P99_BAR_MS:g} ms"
    return [Row(title, measured, bar, p50 <= p50_bar and p99 <= ADDED_P99_BAR_MS)]


def _bytes(value: float) -> str:
    return f"{value:,.0f} B" if abs(value) < 100 * 1024 else f"{value / 1024:,.0f} KiB"


def _against_sqlite_row(t: Comparison, target: str, title: str) -> Row:
    """A set-up that SPEC section 9 allows to cost at most 10 % of the SQLite row's
    throughput (plans, resumable replies with Redis), from the same rounds."""
    to_sqlite = t.ratio(target, "chatmeter")
    measured = (
        f"{to_sqlite:.1%} of the SQLite row, {t.ratio(target):.1%} of the floor "
        f"({t.rate(target):,.0f} vs {t.rate('chatmeter'):,.0f} and {t.rate('floor'):,.0f} "
        f"exchanges/s; errors {t.errors(target)}); server CPU "
        f"{t.cpu_ms_per_exchange(target):.2f} vs {t.cpu_ms_per_exchange('chatmeter'):.2f} ms "
        "per exchange"
    )
    bar = f"≥ {1 - REPLIES_COST_BAR:.0%} of the SQLite row (at most {REPLIES_COST_BAR:.0%} below)"
    met = to_sqlite >= 1 - REPLIES_COST_BAR and t.errors(target) == 0
    return Row(title, measured, bar, met)


def _stop_row(stop: StopLatency) -> Row:
    trials = len(stop.latencies_ms)
    measured = (
        f"p50 {_ms(stop.p50)}, p99 {_ms(stop.p99)}, max {_ms(stop.max)} over {trials} stops; "
        f"failures {len(stop.failures)}"
    )
    bar = f"p99 ≤ {STOP_LATENCY_BAR_MS:g} ms" if stop.bus else "no bar (the documented poll)"
    return Row(f"Stop latency across workers, {stop.variant}", measured, bar, stop.met)


def _held_row(held: HeldReplies) -> Row:
    measured = (
        f"{_bytes(held.net_per_reply)} per held reply beyond a server that drops replies "
        f"({_bytes(held.per_reply)} RSS growth per exchange held, "
        f"{_bytes(held.control.per_exchange)} dropped) over {held.held.exchanges:,} "
        f"exchanges; the reply: {held.reply_chars} characters, {held.events_per_reply} "
        f"events; errors {held.errors}"
    )
    return Row("Memory per held reply (SQLite, in-process log)", measured, "no bar", None)


def summary_rows(results: BenchResults) -> list[Row]:
    rows: list[Row] = []
    rows += _added_rows(
        "Server overhead at 50 concurrent streams (paced model, SQLite)", results.paced
    )
    rows += _added_rows(
        "The same 50 streams in step (all 50 requests at once each second)",
        results.paced_in_step,
        p50_bar=None,
    )
    rows += _added_rows("Added latency, one exchange at a time (SQLite)", results.one_at_a_time)
    rows += _added_rows(
        "Added latency, one exchange at a time (PostgreSQL)",
        results.one_at_a_time,
        "chatmeter-pg",
        ADDED_P50_BAR_POSTGRES_MS,
    )
    rows += _added_rows(
        "Added latency at 50 concurrent, saturated (no delay, SQLite)", results.throughput
    )
    if (t := results.throughput) is not None:
        for target, label, least in (
            ("chatmeter", "SQLite", THROUGHPUT_BAR),
            ("chatmeter-pg", "PostgreSQL", THROUGHPUT_BAR_POSTGRES),
        ):
            if target in t.rounds:
                bar = f"≥ {least:.0%} of the floor"
                measured = (
                    f"{t.ratio(target):.1%} ({t.rate(target):,.0f} vs {t.rate('floor'):,.0f} "
                    f"exchanges/s; errors {t.errors(target)})"
                )
                rows.append(
                    Row(
                        f"Throughput at 50 concurrent, {label}",
                        measured,
                        bar,
                        t.ratio(target) >= least and t.errors(target) == 0,
                    )
                )
        if "chatmeter-redis" in t.rounds and "chatmeter" in t.rounds:
            rows.append(
                _against_sqlite_row(
                    t, "chatmeter-redis", "Throughput at 50 concurrent, SQLite + Redis"
                )
            )
        if "chatmeter-plan" in t.rounds and "chatmeter" in t.rounds:
            title = (
                "Throughput at 50 concurrent, SQLite, the default plan with a period, a spend "
                "limit and both rate limits"
            )
            rows.append(_against_sqlite_row(t, "chatmeter-plan", title))
    rows += [_stop_row(stop) for stop in results.stop_latency]
    if results.held_replies is not None:
        rows.append(_held_row(results.held_replies))
    if (s := results.open_streams) is not None:
        peak = max(w.rss_peak for w in s.waves)
        first = s.waves[0]
        measured = (
            f"{first.streams:,} streams per wave x {len(s.waves)}: errors {s.errors}, "
            f"most streaming at once {min(w.peak_open for w in s.waves):,}, "
            f"peak RSS {peak / MIB:,.0f} MiB ("
            + ", ".join(f"wave {i}: {w.rss_peak / MIB:,.0f}" for i, w in enumerate(s.waves, 1))
            + f"), piece lateness p99 {_ms(max(w.lateness_p99_ms for w in s.waves))}, "
            f"first piece p99 {_ms(max(w.first_piece_p99_ms for w in s.waves))}"
        )
        bar = (
            f"{OPEN_STREAMS_BAR:,} open on one worker, no errors, bounded memory "
            f"(wave 2 peak ≤ wave 1 + {MEMORY_GROWTH_ALLOWED:.0%})"
        )
        meets_count = first.streams >= OPEN_STREAMS_BAR
        rows.append(Row("Open streams on one worker", measured, bar, s.met and meets_count))
    if results.count_calls_per_exchange is not None:
        value = results.count_calls_per_exchange
        rows.append(
            Row(
                "Count-token calls per exchange (provider reports usage)",
                f"{value:.3f} over {results.count_exchanges:,} complete exchanges",
                "0",
                value == 0,
            )
        )
    if (m := results.local_model) is not None and m.chatmeter:
        measured = (
            f"{m.ratio:.1%} ({m.chatmeter_tps:.1f} tokens/s through chatmeter vs "
            f"{m.llama_reported_tps:.1f} reported by llama.cpp; "
            f"{m.llama_client_tps:.1f} seen by a client of llama.cpp)"
        )
        rows.append(
            Row(
                "Local model tokens per second",
                measured,
                f"≥ {LOCAL_SPEED_BAR:.0%} of llama.cpp's own",
                m.ratio >= LOCAL_SPEED_BAR,
            )
        )
    if results.statements:
        measured = "; ".join(
            f"{c.database}: {c.per_exchange:g} statements, {c.commits_per_exchange:g} commits"
            for c in results.statements
        )
        rows.append(Row("SQL statements per exchange", measured, "no bar", None))
    for section, why in results.skipped.items():
        rows.append(Row(section, f"not measured: {why}", "", None))
    return rows


def console_table(results: BenchResults) -> Table:
    table = Table(title="chatmeter against SPEC §9", show_lines=True)
    table.add_column("Figure")
    table.add_column("Measured")
    table.add_column("Bar")
    table.add_column("Verdict")
    for row in summary_rows(results):
        style = {True: "green", False: "red", None: "dim"}[row.met]
        verdict = {True: "met", False: "not met", None: "—"}[row.met]
        table.add_row(row.figure, row.measured, row.bar, f"[{style}]{verdict}[/{style}]")
    return table


def print_report(results: BenchResults, console: Console) -> None:
    console.print(console_table(results))
    if results.sweep:
        table = Table(title="Concurrency sweep")
        for column in ("clients", "floor /s", "chatmeter /s", "floor p99", "chatmeter p99"):
            table.add_column(column, justify="right")
        for p in results.sweep:
            table.add_row(
                str(p.concurrency),
                f"{p.floor.throughput:,.0f}",
                f"{p.chatmeter.throughput:,.0f}",
                _ms(p.floor.p99_ms),
                _ms(p.chatmeter.p99_ms),
            )
        console.print(table)


def _rounds_table(comparison: Comparison) -> list[str]:
    lines = [
        "| round | server | exchanges/s | p50 | p90 | p99 | max | errors "
        "| server CPU | client CPU | other CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    count = max(len(r) for r in comparison.rounds.values())
    for index in range(count):
        for name, rounds in comparison.rounds.items():
            if index < len(rounds):
                lines.append(f"| {index + 1} | {name} | " + _load_cells(rounds[index]))
    return lines


def _load_cells(r: LoadResult) -> str:
    return (
        f"{r.throughput:,.1f} | {_ms(r.p50_ms)} | {_ms(r.p90_ms)} | {_ms(r.p99_ms)} | "
        f"{_ms(r.max_ms)} | {r.errors} | {r.server_cpu_seconds / r.seconds:.0%} | "
        f"{r.client_cpu_seconds / r.seconds:.0%} | {r.other_cpu_seconds / r.seconds:.0%} |"
    )


def markdown(results: BenchResults, plot_name: str | None) -> str:
    m = results.machine
    started = results.started.strftime("%Y-%m-%d %H:%M UTC")
    took = (results.finished - results.started).total_seconds() if results.finished else 0
    others = [r.other_cpu_seconds / r.seconds for r in results.load_results()]
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (which runs `python -m tools.bench`); do not edit by hand.",
        "Earlier runs, before and after each speed change: "
        "[benchmarks-history.md](benchmarks-history.md), which also says why each bar not "
        "met is not.",
        "",
        f"- Command: `{results.command}`" + (" (quick run: short rounds)" if results.quick else ""),
        f"- Date: {started}, {took / 60:.1f} minutes",
        f"- Machine: {m.describe()}",
        f"- Load average when the run began: {', '.join(f'{x:.2f}' for x in m.load_average)}",
        f"- Load generator: {results.wrk_version}; open-files limit {results.open_files_limit:,}",
    ]
    if others and sorted(others)[len(others) // 2] > NOISY_OTHER_CPU:
        out += [
            "",
            "**Other processes were busy during this run** (see the other-CPU columns): the "
            "figures are noisy. Re-run `make bench` on a quiet machine.",
            "",
        ]
    if others:
        out.append(
            "- Other processes' CPU during the load runs: median "
            f"{sorted(others)[len(others) // 2]:.0%}, most {max(others):.0%} of one core "
            "(0% on a quiet machine; more means noise)"
        )
    out += [
        "",
        "## Against the bars of SPEC §9",
        "",
        "| Figure | Measured | Bar | Verdict |",
        "|---|---|---|---|",
    ]
    out += [f"| {r.figure} | {r.measured} | {r.bar} | {r.verdict} |" for r in summary_rows(results)]
    out += ["", *METHOD.strip().splitlines()]
    for title, comparison in (
        ("One exchange at a time", results.one_at_a_time),
        ("50 concurrent clients, no delay (throughput)", results.throughput),
        ("50 concurrent streams, paced model", results.paced),
        ("50 concurrent streams, paced model, in step", results.paced_in_step),
    ):
        if comparison is not None:
            out += [
                "",
                f"### {title}",
                "",
                f"Scripted reply: {comparison.scenario.describe()}; "
                f"{comparison.concurrency} client(s)"
                + (
                    f", their first requests spread over {comparison.spread_seconds:g} s"
                    if comparison.spread_seconds
                    else ""
                )
                + ". Latency is request sent to end event received. Medians over the rounds:",
                "",
            ]
            for name in comparison.rounds:
                out.append(
                    f"- {name}: {comparison.rate(name):,.1f} exchanges/s, "
                    f"p50 {_ms(comparison.p50(name))}, p99 {_ms(comparison.p99(name))}, "
                    f"server CPU {comparison.cpu_ms_per_exchange(name):.2f} ms per exchange"
                    + (
                        f", {comparison.ratio(name):.1%} of the floor"
                        f" (rounds: {', '.join(f'{x:.1%}' for x in comparison.round_ratios(name))})"
                        if name != "floor"
                        else ""
                    )
                )
            out += ["", *_rounds_table(comparison)]
    if results.sweep:
        out += ["", "### Concurrency sweep", ""]
        if plot_name:
            out += [f"![throughput and p99 against concurrency]({plot_name})", ""]
        out += [
            "| clients | floor exchanges/s | chatmeter exchanges/s | ratio | floor p99 "
            "| chatmeter p99 | chatmeter server CPU |",
            "|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for p in results.sweep:
            ratio = p.chatmeter.throughput / p.floor.throughput if p.floor.throughput else 0
            out.append(
                f"| {p.concurrency} | {p.floor.throughput:,.0f} | {p.chatmeter.throughput:,.0f} "
                f"| {ratio:.1%} | {_ms(p.floor.p99_ms)} | {_ms(p.chatmeter.p99_ms)} "
                f"| {p.chatmeter.server_cpu_share:.0%} |"
            )
    if results.statements:
        out += [
            "",
            "### SQL statements per exchange",
            "",
            f"Over {results.statements[0].exchanges} complete exchanges, one at a time, in one "
            "chat (after three to fill its history), counted below every driver: SQLite's "
            "trace callback on each connection (chatmeter in the benchmark's process; nothing "
            "is timed) and PostgreSQL's `pg_stat_statements` (there, each statement is a "
            "network round trip; pool pings are not statements and are not counted).",
            "",
            "| statement | " + " | ".join(c.database for c in results.statements) + " |",
            "|---|" + "--:|" * len(results.statements),
        ]
        kinds = sorted({k for c in results.statements for k in c.statements})
        for kind in kinds:
            cells = " | ".join(f"{c.statements[kind] / c.exchanges:g}" for c in results.statements)
            out.append(f"| `{kind}` | {cells} |")
        totals = " | ".join(f"**{c.per_exchange:g}**" for c in results.statements)
        out.append(f"| all | {totals} |")
    if (s := results.open_streams) is not None:
        out += [
            "",
            "### Open streams",
            "",
            f"Scripted reply: {s.scenario.describe()}, a fresh chatmeter process on a fresh "
            "SQLite file; each stream its own user and chat; streams opened evenly over the "
            "ramp. Piece lateness: how much later than the scripted pause a piece after the "
            "first arrived; *all open*: only pieces that came while every stream was open "
            "and none had ended (holding streams, not opening or settling any). First "
            "piece: request to first piece beyond the pause (starting the exchange, queueing "
            "included). Finished replies stay held for resuming (CHATMETER_REPLAY_SECONDS, "
            "300 s), so wave 2 runs with wave 1's replies still held. Peak RSS over the "
            "server's life (VmHWM of the worker and of its SQLite writer process, added up): "
            f"{s.process_peak_rss / MIB:,.0f} MiB.",
            "",
            "| wave | streams | errors | most streaming at once | RSS before | RSS peak "
            "| RSS after | piece lateness p50 | p99 | max | p99 all open "
            "| first piece p50 | p99 | seconds | client CPU |",
            "|" + "--:|" * 15,
        ]
        for i, w in enumerate(s.waves, 1):
            out.append(
                f"| {i} | {w.streams:,} | {w.errors} | {w.peak_open:,} | "
                f"{w.rss_before / MIB:,.0f} MiB | {w.rss_peak / MIB:,.0f} MiB | "
                f"{w.rss_after / MIB:,.0f} MiB | {_ms(w.lateness_p50_ms)} | "
                f"{_ms(w.lateness_p99_ms)} | {_ms(w.lateness_max_ms)} | "
                f"{_ms(w.holding_lateness_p99_ms)} | {_ms(w.first_piece_p50_ms)} | "
                f"{_ms(w.first_piece_p99_ms)} | {w.seconds:.1f} | {w.client_cpu_share:.0%} |"
            )
        samples = sorted({e for w in s.waves for e in w.error_samples})
        if samples:
            out += ["", "Errors seen (samples):", "", *(f"- `{e}`" for e in samples)]
    if results.stop_latency:
        out += ["", *_stop_section(results.stop_latency)]
    if results.held_replies is not None:
        out += ["", *_held_section(results.held_replies)]
    if (lm := results.local_model) is not None and lm.chatmeter:
        out += [
            "",
            "### Local model",
            "",
            f"The built-in `local` model (SmolLM2-135M-Instruct, llama.cpp through xllamacpp), "
            f"max_output_tokens {lm.max_tokens}, the same prompt each time (a fresh chat: no "
            "history). llama.cpp's own server is started directly in a process of its own with "
            "the same GGUF and parameters and asked the same request over "
            "/v1/chat/completions. Decoding speed seen by the client: (tokens - 1) / (last "
            "piece - first piece). Runs alternate.",
            "",
            "| run | through chatmeter tokens/s | tokens | llama.cpp reported tokens/s "
            "| llama.cpp seen by its client | tokens |",
            "|--:|--:|--:|--:|--:|--:|",
        ]
        for i, (ours, theirs) in enumerate(zip(lm.chatmeter, lm.llama, strict=False), 1):
            out.append(
                f"| {i} | {ours.tokens_per_second:.1f} | {ours.completion_tokens} | "
                f"{theirs.reported_tokens_per_second or 0:.1f} | "
                f"{theirs.tokens_per_second:.1f} | {theirs.completion_tokens} |"
            )
    return "\n".join(out) + "\n"


def _stop_section(stops: list[StopLatency]) -> list[str]:
    lines = [
        "### Stop latency across workers",
        "",
        "Two single-worker chatmeter servers, A and B, on one database (two hosts, in "
        "effect: `--workers 2` shares one port, so a client cannot pick the worker). A "
        "scripted reply streams from A (a piece every 50 ms); after its first piece, "
        "`POST /api/chat/{id}/stop` goes to B. Latency: from sending the stop to the end "
        'event (`finish_reason` "stopped") arriving on A\'s stream. One stop at a time, '
        "each in a chat of its own, after two that are not counted. *Stop answered*: B's "
        "202, which comes once the flag is in the database and the stop announced.",
        "",
        "| variant | stops | p50 | p99 | max | stop answered p50 | failures |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for stop in stops:
        lines.append(
            f"| {stop.variant} | {len(stop.latencies_ms)} | {_ms(stop.p50)} | "
            f"{_ms(stop.p99)} | {_ms(stop.max)} | "
            f"{_ms(stop.answer_p50)} "
            f"| {len(stop.failures)} |"
        )
    failures = sorted({f for stop in stops for f in stop.failures})[:5]
    if failures:
        lines += ["", "Failures seen (samples):", "", *(f"- `{f}`" for f in failures)]
    return lines


def _held_section(held: HeldReplies) -> list[str]:
    lines = [
        "### Memory per held reply",
        "",
        f"A fresh chatmeter on a fresh SQLite file answers {held.held.exchanges:,} complete "
        f"exchanges ({held.reply_chars}-character reply, {held.events_per_reply} events), 50 "
        "at a time over 100 chats, after a warm-up of 200; RSS (worker and SQLite writer) "
        "is read before them and once the server is idle after them. Each reply stays held "
        "for resuming (CHATMETER_REPLAY_SECONDS, 300 s). The control is the same run on "
        "a server that drops each reply at its end (CHATMETER_REPLAY_SECONDS=0): what grows "
        "there too (caches, database pages) is not the held replies.",
        "",
        "| server | RSS before | RSS after | growth per exchange | errors |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, memory in (("replies held", held.held), ("control, replies dropped", held.control)):
        lines.append(
            f"| {name} | {memory.rss_before / MIB:,.1f} MiB | {memory.rss_after / MIB:,.1f} MiB "
            f"| {_bytes(memory.per_exchange)} | {memory.errors} |"
        )
    lines += ["", f"Per held reply: **{_bytes(held.net_per_reply)}**."]
    return lines


METHOD = """
## How it was measured

Every server runs as a process of its own with one uvicorn worker (uvloop, httptools),
started the way production starts it (`chatmeter serve --workers 1`); the load comes from
other processes. The **floor** (`tools/bench/floor.py`) is a bare Starlette SSE endpoint
served with the same uvicorn settings that streams the same pieces with the same pacing and
event framing (`id: N` / `data: {json}`), a first event naming the reply and an end event of
the same shapes, with no auth, database or metering. Whatever chatmeter costs beyond the
floor is what chatmeter adds.

- **Load generator**: `wrk` (C, epoll), with one thread per connection (`-t N -c N`) so
  that each connection is one client with its own user, token and chat, all made before
  the clock starts (wrk's Lua hooks know the thread, not the connection). A Lua hook counts
  an exchange only when it answered 200 and ended with the end event. The tables show the
  CPU the server, wrk and everything else used: the server near one full core while wrk
  uses a fraction of the other is what a server-bound measurement looks like. A server's
  CPU and memory are those of its process and the processes it started: chatmeter on
  SQLite runs its transactions in a writer process, so its CPU can pass one core.
- **Latency** is request sent to end event received (wrk: request written to response
  complete; the end event is the last bytes). *Added* latency is chatmeter's percentile
  minus the floor's, from the median of alternating rounds.
- **Server overhead at 50 concurrent streams** uses a paced scripted model (the provider
  takes a second per reply) so that 50 streams are open without saturating the worker;
  the provider's own time is the same on both sides and cancels in the difference.
  The clients' first requests are spread evenly over that second (wrk's `delay` hook
  holds each client's first request back by its share; wrk times a request from when it
  is written), as 50 users who do not coordinate arrive; every reply then takes the same
  second, so they stay spread. The bar is judged on this figure.
  The same 50 streams are also measured **in step**: started together, they stay
  together, so 50 requests, then 50 settlements, arrive at once each second, and the
  median request waits behind the work of about half the others: every microsecond an
  exchange costs beyond the floor counts some 25 times. That figure is reported, not
  judged.
  **Saturated** (no delay, 50 clients as fast as they go) latency is queueing: by Little's
  law it is 50 / throughput, so it restates the throughput figure.
- **Throughput** is complete exchanges per second at 50 concurrent clients, in rounds
  alternating floor, chatmeter on SQLite, chatmeter on PostgreSQL and chatmeter on SQLite
  with Redis (`CHATMETER_REDIS_URL`: replies logged to Redis Streams, a throwaway local
  `redis-server` without persistence) so drift hits all.
  PostgreSQL 15 is a throwaway local server (`synchronous_commit=off`, as SQLite's WAL with
  `synchronous=NORMAL` does not wait for the disk either) on the same two cores; its CPU
  shows in the *other CPU* column of the PostgreSQL rounds.
- **Count-token calls** are read from `/metrics` around a clean batch of complete exchanges
  (streams that wrk cuts at the end of a round are metered by counting, rightly).
- Budgets are made large (`CHATMETER_DEFAULT_TOKEN_LIMIT`) so no exchange is refused.
""".strip()


def write_plot(results: BenchResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [p.concurrency for p in results.sweep]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pick in (("floor", "floor"), ("chatmeter (SQLite)", "chatmeter")):
        loads = [getattr(p, pick) for p in results.sweep]
        left.plot(levels, [r.throughput for r in loads], marker="o", label=name)
        right.plot(levels, [r.p99_ms for r in loads], marker="o", label=name)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="exchanges / s",
        title="Throughput (one worker)",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="ms",
        title="p99 latency, request to end event",
    )
    for axis in (left, right):
        axis.set_xticks(levels, [str(x) for x in levels])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"chatmeter vs bare Starlette SSE floor — {results.started:%Y-%m-%d}, "
        f"{results.machine.cores} cores"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: BenchResults, output: Path, plot: Path | None) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if plot is not None and results.sweep:
        write_plot(results, plot)
        plot_name = plot.name if plot.parent.resolve() == output.parent.resolve() else str(plot)
    output.write_text(markdown(results, plot_name))
