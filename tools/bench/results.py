"""What a run measured, and each figure against its bar from SPEC section 9."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime

from tools.bench.llama import GenerationTiming
from tools.bench.load import LoadResult
from tools.bench.machine import Machine
from tools.bench.statements import StatementCount

# SPEC section 9
ADDED_P50_BAR_MS = 2.0
ADDED_P99_BAR_MS = 10.0
THROUGHPUT_BAR = 0.60
THROUGHPUT_BAR_POSTGRES = 0.50
# PostgreSQL: one exchange at a time adds at most this at p50
ADDED_P50_BAR_POSTGRES_MS = 1.0
OPEN_STREAMS_BAR = 2000
LOCAL_SPEED_BAR = 0.97
# plans, prices, rate limits and resumable replies may cost this much of the throughput,
# with Redis configured or not
REPLIES_COST_BAR = 0.10
# SPEC section 11: a stop ends the reply within this, on whichever worker holds it
STOP_LATENCY_BAR_MS = 100.0
# "bounded memory": the second wave of streams may not peak more than this above the first
MEMORY_GROWTH_ALLOWED = 0.10


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[max(0, min(len(ordered), rank) - 1)]


def rate(results: list[LoadResult]) -> float:
    """Exchanges per second over all rounds together."""
    seconds = sum(r.seconds for r in results)
    return sum(r.exchanges for r in results) / seconds if seconds else 0.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """The scripted reply every scenario streams, and its pacing."""

    reply_chars: int
    chunks: int
    delay_ms: float

    def describe(self) -> str:
        pacing = f"{self.delay_ms:g} ms before each" if self.delay_ms else "no delay"
        return f"{self.reply_chars}-character reply in {self.chunks} pieces, {pacing}"


@dataclass
class Comparison:
    """chatmeter and the floor (and maybe other chatmeter set-ups) in alternating rounds."""

    scenario: Scenario
    concurrency: int
    rounds: dict[str, list[LoadResult]]  # target name -> its rounds, in run order
    spread_seconds: float = 0.0  # the clients' first requests spread over this long

    def p50(self, target: str) -> float:
        return median([r.p50_ms for r in self.rounds[target]])

    def p99(self, target: str) -> float:
        return median([r.p99_ms for r in self.rounds[target]])

    def rate(self, target: str) -> float:
        return rate(self.rounds[target])

    def errors(self, target: str) -> int:
        return sum(r.errors for r in self.rounds[target])

    def cpu_ms_per_exchange(self, target: str) -> float:
        """Server CPU time (all its threads) per complete exchange."""
        rounds = self.rounds[target]
        exchanges = sum(r.exchanges for r in rounds)
        return sum(r.server_cpu_seconds for r in rounds) * 1000 / exchanges if exchanges else 0.0

    def added_p50(self, target: str = "chatmeter") -> float:
        return self.p50(target) - self.p50("floor")

    def added_p99(self, target: str = "chatmeter") -> float:
        return self.p99(target) - self.p99("floor")

    def ratio(self, target: str = "chatmeter", reference: str = "floor") -> float:
        base = self.rate(reference)
        return self.rate(target) / base if base else 0.0

    def round_ratios(self, target: str = "chatmeter") -> list[float]:
        return [
            a.throughput / b.throughput if b.throughput else 0.0
            for a, b in zip(self.rounds[target], self.rounds["floor"], strict=False)
        ]


@dataclass
class SweepPoint:
    concurrency: int
    floor: LoadResult
    chatmeter: LoadResult


@dataclass
class StreamWave:
    streams: int
    errors: int
    error_samples: list[str]
    peak_open: int
    rss_before: int
    rss_peak: int
    rss_after: int
    # pieces after the first: gap to the previous piece beyond the scripted pause
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float
    # the same, only pieces that came while every stream was open and none had ended
    # (holding the streams, not opening or settling any); NaN when there was no such time
    holding_lateness_p99_ms: float
    # request to first piece beyond the scripted pause (starting the exchange, queueing)
    first_piece_p50_ms: float
    first_piece_p99_ms: float
    seconds: float
    client_cpu_share: float  # of one core: the benchmark's own process, reading the streams


@dataclass
class OpenStreams:
    scenario: Scenario
    waves: list[StreamWave]
    process_peak_rss: int  # VmHWM of the server at the end

    @property
    def errors(self) -> int:
        return sum(w.errors for w in self.waves)

    @property
    def memory_bounded(self) -> bool:
        first, last = self.waves[0], self.waves[-1]
        return last.rss_peak <= first.rss_peak * (1 + MEMORY_GROWTH_ALLOWED)

    @property
    def met(self) -> bool:
        target = self.waves[0].streams
        return (
            self.errors == 0
            and all(w.peak_open >= target for w in self.waves)
            and self.memory_bounded
        )


@dataclass
class StopLatency:
    """Stops posted to one worker while another streams the reply: from sending the stop
    to the end event (finish_reason "stopped") on the generating worker's stream."""

    variant: str
    bus: bool  # a signal carries the stop (the bar applies); False: the poll alone
    latencies_ms: list[float]
    answer_ms: list[float]  # the stop request's own answer (202) from the other worker
    failures: list[str] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def max(self) -> float:
        return max(self.latencies_ms, default=float("nan"))

    @property
    def answer_p50(self) -> float:
        return percentile(self.answer_ms, 50)

    @property
    def met(self) -> bool | None:
        if not self.bus:
            return None
        return not self.failures and bool(self.latencies_ms) and self.p99 <= STOP_LATENCY_BAR_MS


@dataclass
class HeldMemory:
    """RSS of one fresh server before and after a batch of complete exchanges."""

    rss_before: int
    rss_after: int
    exchanges: int
    errors: int

    @property
    def per_exchange(self) -> float:
        return (self.rss_after - self.rss_before) / self.exchanges if self.exchanges else 0.0


@dataclass
class HeldReplies:
    """Memory per finished reply held for resuming (CHATMETER_REPLAY_SECONDS), against a
    control server that drops each reply at its end (CHATMETER_REPLAY_SECONDS=0)."""

    reply_chars: int
    events_per_reply: int
    held: HeldMemory
    control: HeldMemory

    @property
    def per_reply(self) -> float:
        """RSS growth per exchange, replies held."""
        return self.held.per_exchange

    @property
    def net_per_reply(self) -> float:
        """What holding a reply adds: the growth beyond the control's."""
        return self.held.per_exchange - self.control.per_exchange

    @property
    def errors(self) -> int:
        return self.held.errors + self.control.errors


@dataclass
class LocalModel:
    max_tokens: int
    chatmeter: list[GenerationTiming]
    llama: list[GenerationTiming]

    @property
    def chatmeter_tps(self) -> float:
        return median([t.tokens_per_second for t in self.chatmeter])

    @property
    def llama_client_tps(self) -> float:
        return median([t.tokens_per_second for t in self.llama])

    @property
    def llama_reported_tps(self) -> float:
        return median([t.reported_tokens_per_second or 0.0 for t in self.llama])

    @property
    def ratio(self) -> float:
        reference = self.llama_reported_tps or self.llama_client_tps
        return self.chatmeter_tps / reference if reference else 0.0


@dataclass
class BenchResults:
    machine: Machine
    command: str
    started: datetime
    quick: bool
    wrk_version: str
    open_files_limit: int
    one_at_a_time: Comparison | None = None
    throughput: Comparison | None = None
    paced: Comparison | None = None  # the clients spread over a reply's time
    paced_in_step: Comparison | None = None  # all 50 at once
    sweep: list[SweepPoint] = field(default_factory=list)
    count_calls_per_exchange: float | None = None
    count_exchanges: int = 0
    statements: list[StatementCount] = field(default_factory=list)
    open_streams: OpenStreams | None = None
    stop_latency: list[StopLatency] = field(default_factory=list)
    held_replies: HeldReplies | None = None
    local_model: LocalModel | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # section -> why
    finished: datetime | None = None

    def load_results(self) -> list[LoadResult]:
        found: list[LoadResult] = []
        for comparison in (
            self.one_at_a_time,
            self.throughput,
            self.paced,
            self.paced_in_step,
        ):
            if comparison is not None:
                for rounds in comparison.rounds.values():
                    found.extend(rounds)
        for point in self.sweep:
            found.extend((point.floor, point.chatmeter))
        return found
