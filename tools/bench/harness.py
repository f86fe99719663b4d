"""What every measurement shares: the options, the scripted models, the run's folder and
secret, and the servers it started."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatmeter.db.migrate import upgrade
from tools.bench.fixtures import chatmeter_slots, floor_slots
from tools.bench.load import LoadResult, Slot, run_wrk
from tools.bench.processes import ServerProcess, free_port, start_server
from tools.bench.results import Scenario

REPLY = (
    "A benchmark is only as honest as its baseline. This reply stands in for a model's "
    "answer: it is streamed in pieces, each piece becomes one server-sent event, and the "
    "last event carries the usage that was billed. The floor streams exactly these pieces "
    "with no authentication, no database and no metering, so whatever chatmeter costs "
    "beyond the floor is what chatmeter adds to every exchange."
)
CHUNKS = 10
INSTANT = Scenario(len(REPLY), CHUNKS, 0.0)
PACED = Scenario(len(REPLY), CHUNKS, 100.0)  # one second of "provider" per exchange
# thirty seconds per stream: long enough that every stream is open at once even when
# opening them all takes twice the ramp
SLOW = Scenario(len(REPLY), 30, 1000.0)
# a reply to stop: its first piece comes quickly, its end would take eight seconds
STOPPABLE = Scenario(len(REPLY), 160, 50.0)
MODELS = {"bench": INSTANT, "paced": PACED, "slow": SLOW, "stoppable": STOPPABLE}
LOCAL_MAX_TOKENS = 200
HUGE_BUDGET = 10**15


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    postgres: bool = True
    redis: bool = True
    local_model: bool = True
    streams: int = 2000

    # how long each measurement runs, full / quick
    @property
    def latency_rounds(self) -> tuple[int, float]:
        return (2, 2.0) if self.quick else (3, 5.0)

    # Throughput and the local model take more rounds than the rest: single rounds of
    # one run read 38-77 % of the floor, and llama.cpp's own speed 49-67 tokens/s, on
    # this 2-core machine; the median of five (nine) moves less than that of three (five).
    @property
    def throughput_rounds(self) -> tuple[int, float]:
        return (2, 3.0) if self.quick else (5, 8.0)

    @property
    def paced_rounds(self) -> tuple[int, float]:
        return (1, 4.0) if self.quick else (2, 10.0)

    @property
    def sweep(self) -> tuple[tuple[int, ...], float]:
        return ((1, 10, 50), 2.0) if self.quick else ((1, 10, 50, 100, 200), 4.0)

    @property
    def stream_ramp_seconds(self) -> float:
        return 3.0 if self.quick else 10.0

    @property
    def local_runs(self) -> int:
        return 1 if self.quick else 9

    @property
    def stop_trials(self) -> int:
        return 10 if self.quick else 30

    @property
    def held_replies(self) -> int:
        return 500 if self.quick else 2000


Progress = Callable[[str], None]


def config_toml() -> str:
    lines = []
    for name, scenario in MODELS.items():
        lines += [
            f"[models.{name}]",
            'provider = "scripted"',
            f'reply = "{REPLY}"',
            f"chunks = {scenario.chunks}",
            f"delay_ms = {scenario.delay_ms}",
            # prices, so that every exchange is costed (money in the ledger, the spend)
            "price_input = 0.30",
            "price_output = 2.50",
            "",
        ]
    # a plan with everything SPEC section 10 adds, each far from refusing: the
    # throughput with it is measured against the default plan's (no period, no limits)
    lines += [
        "[plans.full]",
        f"token_limit = {HUGE_BUDGET}",
        "spend_limit = 1000000",
        'period = "day"',
        "requests_per_minute = 1000000",
        "concurrent_replies = 1000",
        "",
    ]
    # the built-in local model, with a shorter output cap
    lines += [
        "[models.local]",
        'provider = "local"',
        'model = "SmolLM2-135M-Instruct"',
        f"max_output_tokens = {LOCAL_MAX_TOKENS}",
    ]
    return "\n".join(lines) + "\n"


class Bench:
    """The state of one run: its folder, its secret, its servers."""

    def __init__(self, options: BenchOptions, workdir: Path, progress: Progress) -> None:
        self.options = options
        self.workdir = workdir
        self.say = progress
        self.secret = secrets.token_urlsafe(48)
        self.config = workdir / "bench.toml"
        self.config.write_text(config_toml())
        self.servers: list[ServerProcess] = []

    def env(self, database_url: str) -> dict[str, str]:
        return {
            "CHATMETER_CONFIG": str(self.config),
            "CHATMETER_DATABASE_URL": database_url,
            "CHATMETER_JWT_SECRET": self.secret,
            "CHATMETER_DEFAULT_TOKEN_LIMIT": str(HUGE_BUDGET),
        }

    def start_chatmeter(
        self, name: str, database_url: str, settings: dict[str, str] | None = None
    ) -> ServerProcess:
        """A chatmeter server on `database_url`, with `settings` (CHATMETER_* variables)
        on top of the run's own."""
        upgrade(database_url)
        port = free_port()
        args = ["-m", "chatmeter", "serve", "--host", "127.0.0.1", "--port", str(port)]
        server = start_server(
            name,
            [*args, "--workers", "1"],
            port=port,
            env={**self.env(database_url), **(settings or {})},
            workdir=self.workdir,
            ready_path="/readyz",
        )
        self.servers.append(server)
        return server

    def start_floor(self) -> ServerProcess:
        port = free_port()
        server = start_server(
            "floor",
            ["-m", "tools.bench.floor", "--host", "127.0.0.1", "--port", str(port)],
            port=port,
            env={"CHATMETER_CONFIG": str(self.config)},
            workdir=self.workdir,
            ready_path="/healthz",
        )
        self.servers.append(server)
        return server

    def sqlite_url(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{self.workdir / name}.db"

    def slots(self, server: ServerProcess, model: str, count: int) -> list[Slot]:
        if server.name == "floor":
            return floor_slots(self.secret, model, count)
        return asyncio.run(chatmeter_slots(server.url, self.secret, model, count, server.name))

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()


def wait_idle(server: ServerProcess, timeout: float = 10.0) -> None:
    """Let the server finish what the last run left (settling cut-off streams)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server.cpu_seconds()
        time.sleep(0.2)
        if server.cpu_seconds() - before < 0.01:
            return


def alternate(
    bench: Bench,
    targets: dict[str, tuple[ServerProcess, list[Slot]]],
    rounds: int,
    seconds: float,
    label: str,
    spread_seconds: float = 0.0,
) -> dict[str, list[LoadResult]]:
    """Rounds of A B (C) A B (C)...: whatever drifts over the run hits every target alike.
    The clients' first requests spread over `spread_seconds` (`run_wrk`)."""
    results: dict[str, list[LoadResult]] = {name: [] for name in targets}
    for index in range(rounds):
        for name, (server, slots) in targets.items():
            wait_idle(server)
            bench.say(f"{label}: round {index + 1}/{rounds}, {name}")
            results[name].append(
                run_wrk(
                    server,
                    slots,
                    seconds=seconds,
                    workdir=bench.workdir,
                    spread_seconds=spread_seconds,
                )
            )
    return results
