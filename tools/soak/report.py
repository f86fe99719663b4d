"""The soak's figures, and docs/reliability.md made from them."""

from __future__ import annotations

import math
import os
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tools.soak.audit import Audit
from tools.soak.plan import EXPECTED_STATUS, KINDS, SoakConfig, TrialResult

ABOUT = """\
The randomized reliability trial of issue 7. `chatmeter serve --workers {workers}` runs on
PostgreSQL against a loopback server speaking the Gemini API (the real `google-genai` SDK on
the chatmeter side). {users} users with {chats} chats each send {trials} messages, at most
{concurrency} in flight and each chat used by one trial at a time. Each trial, drawn from
the seed, either completes (Gemini usage on the last chunk or on every chunk), completes
without any usage (so it is counted with `countTokens`), is left by its client after k
chunks (k = 0: as soon as the response starts), is stopped with `POST …/stop` on a fresh
connection after k chunks (so the stop may land on the worker not holding the stream),
loses its upstream connection after k pieces (k = 0: before the first), or is refused by
Gemini with a 429 up front.
Two races complete the set: the client leaves, or sends a stop, right after the last chunk,
while the reply is being settled. Usage arrives on the last chunk, on every chunk or not at
all, at random. Once nothing is reserved any more, the database is audited.

Reproduce with `make soak SEED={seed}` (`make soak` draws a new seed; `make test` runs a
{small}-trial version as `tests/tools/test_soak.py`). Only loopback traffic is involved.
"""


@dataclass
class Report:
    config: SoakConfig
    command: str
    began: float
    duration: float
    phase_seconds: float
    quiet_seconds: float | None
    database: str
    machine: str
    ran: int
    by_kind: Counter[str]
    by_status: Counter[str]
    error_codes: Counter[str]
    billed: int
    by_source: dict[str, tuple[int, int]]  # source -> (messages, tokens)
    latency: dict[str, tuple[int, float, float]]  # what -> (n, p50 ms, p99 ms)
    server_log_errors: list[str]
    races: dict[str, Counter[str]]  # late race -> how it ended
    audit: Audit

    @property
    def passed(self) -> bool:
        return self.audit.passed

    def markdown(self, small_trials: int = 120) -> str:
        c = self.config
        lines = [
            "# Reliability: the randomized soak",
            "",
            ABOUT.format(
                workers=c.workers,
                users=c.users,
                chats=c.chats_per_user,
                trials=c.trials,
                concurrency=c.concurrency,
                seed=c.seed,
                small=small_trials,
            ),
            "## The run",
            "",
            "| | |",
            "|---|---|",
            f"| result | **{'all invariants hold' if self.passed else 'INVARIANTS BROKEN'}** |",
            f"| seed | `{c.seed}` |",
            f"| command | `{self.command}` |",
            f"| date | {datetime.fromtimestamp(self.began, UTC):%Y-%m-%d %H:%M} UTC |",
            f"| duration | {self.duration:.1f} s in all; the trials {self.phase_seconds:.1f} s |",
            f"| machine | {self.machine} |",
            f"| database | PostgreSQL {self.database}, {c.workers} chatmeter workers |",
            f"| trials | {self.ran} of {c.trials} run, {c.concurrency} in flight |",
            f"| throughput | {self.ran / max(self.phase_seconds, 1e-9):.1f} exchanges/s |",
            f"| quiet after the last trial | {_seconds(self.quiet_seconds)} |",
            "",
            "## Trials",
            "",
            "| kind | trials | expected final status |",
            "|---|---:|---|",
        ]
        lines += [f"| {k} | {self.by_kind[k]} | {' or '.join(EXPECTED_STATUS[k])} |" for k in KINDS]
        lines += ["", "| final status (database) | replies |", "|---|---:|"]
        lines += [f"| {status} | {n} |" for status, n in sorted(self.by_status.items())]
        for race, outcomes in self.races.items():
            ended = ", ".join(f"{how} {n}" for how, n in sorted(outcomes.items())) or "none run"
            lines += ["", f"How the {race} race ended: {ended}."]
        lines += [
            "",
            "Error events the clients saw: "
            + (", ".join(f"{code} {n}" for code, n in sorted(self.error_codes.items())) or "none")
            + ".",
            "",
            "## Tokens billed",
            "",
            "| metering source | replies | tokens |",
            "|---|---:|---:|",
        ]
        for source, (count, tokens) in sorted(self.by_source.items()):
            lines.append(f"| {source} | {count} | {tokens:,} |")
        lines += [
            f"| **total** | {sum(n for n, _ in self.by_source.values())} | **{self.billed:,}** |",
            "",
            "## Latency",
            "",
            "| measured | n | p50 | p99 |",
            "|---|---:|---:|---:|",
        ]
        for what, (n, p50, p99) in self.latency.items():
            lines.append(f"| {what} | {n} | {p50:.0f} ms | {p99:.0f} ms |")
        lines += [
            "",
            "- A stop is answered by whichever worker the kernel hands its fresh connection; "
            "if that worker holds the stream it ends it at once, otherwise the holder sees "
            "the flag at its next poll (every 0.5 s).",
            "- Latencies include time waiting for a CPU: the soak's client, the fake Gemini, "
            "PostgreSQL and both workers share the machine's CPUs (and other work may too).",
            "- Lines at ERROR level or tracebacks in the server log: "
            f"{len(self.server_log_errors)}"
            + "".join(f"\n  - `{line[:300]}`" for line in self.server_log_errors[:5])
            + ("" if self.server_log_errors else "."),
            *(f"- {note}" for note in self.audit.notes),
            "",
            "## Invariants",
            "",
            "| invariant | checked | result |",
            "|---|---:|---|",
        ]
        for check in self.audit.checks:
            result = "pass" if check.passed else f"**FAIL** ({len(check.failures)})"
            lines.append(f"| {check.name} | {check.looked_at} | {result} |")
        failures = [c for c in self.audit.checks if not c.passed]
        if failures:
            lines += ["", "### Failures", ""]
            for check in failures:
                lines.append(f"- {check.name}:")
                lines += [f"  - {failure}" for failure in check.failures[:10]]
        return "\n".join(lines) + "\n"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _seconds(value: float | None) -> str:
    return "never (time limit)" if value is None else f"{value:.2f} s"


def _spread(values: Sequence[float]) -> tuple[int, float, float]:
    if not values:
        return 0, 0.0, 0.0
    ms = [v * 1000 for v in values]
    return len(ms), percentile(ms, 0.50), percentile(ms, 0.99)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = f", 1-min load average {os.getloadavg()[0]:.1f} at the end"
    return (
        f"{cpu}, {os.cpu_count()} CPUs{memory}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}{load}"
    )


def _log_errors(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]


def figures(
    config: SoakConfig,
    results: list[TrialResult],
    audit: Audit,
    *,
    phase_seconds: float,
    quiet_seconds: float | None,
    began: float,
    duration: float,
    database: str,
    command: str,
    server_log: Path,
) -> Report:
    replies = audit.replies.values()
    by_source: dict[str, tuple[int, int]] = {}
    for reply in replies:
        source = reply.metering_source if reply.tokens_consumed else "nothing billed"
        count, tokens = by_source.get(source, (0, 0))
        by_source[source] = (count + 1, tokens + reply.tokens_consumed)
    seen_end = [r for r in results if r.final is not None]
    stops = [
        (r.stop_sent, r.stop_answered, r.ended)
        for r in seen_end
        if r.stop_sent is not None and r.stop_answered is not None
    ]
    latency = {
        "exchange, request to end event (all that saw one)": _spread(
            [r.ended - r.started for r in seen_end]
        ),
        "exchange that completed": _spread(
            [r.ended - r.started for r in seen_end if r.plan.kind in ("complete", "no_usage")]
        ),
        "request to first chunk": _spread(
            [r.first_chunk - r.started for r in results if r.first_chunk is not None]
        ),
        "stop request to its 202": _spread([answered - sent for sent, answered, _ in stops]),
        "stop's 202 to the end event": _spread([end - answered for _, answered, end in stops]),
        "client gone to reservation released": _spread(
            [r.settled - r.ended for r in results if r.settled is not None and r.left]
        ),
    }
    return Report(
        config=config,
        command=command,
        began=began,
        duration=duration,
        phase_seconds=phase_seconds,
        quiet_seconds=quiet_seconds,
        database=database,
        machine=machine(),
        ran=len(results),
        by_kind=Counter(r.plan.kind for r in results),
        by_status=Counter(reply.status for reply in replies),
        error_codes=Counter(
            str(r.final["code"]) for r in seen_end if r.final and r.final.get("error")
        ),
        billed=sum(reply.tokens_consumed for reply in replies),
        by_source=by_source,
        latency=latency,
        server_log_errors=_log_errors(server_log),
        races={
            "late stop (stop answer, then final status)": Counter(
                f"{r.stop_status} then {audit.replies[r.plan.index].status}"
                for r in results
                if r.plan.kind == "late_stop" and r.plan.index in audit.replies
            ),
            "late disconnect (final status)": Counter(
                audit.replies[r.plan.index].status
                for r in results
                if r.plan.kind == "late_disconnect" and r.plan.index in audit.replies
            ),
        },
        audit=audit,
    )
