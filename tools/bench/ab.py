"""A/B: chatmeter from two (or more) source trees against the floor, in alternating rounds
of 50 clients, to measure one change at a time (docs/benchmarks-history.md).

    cd /tmp && PYTHONPATH=$CHECKOUT python -m tools.bench.ab \
        before=/path/to/other/checkout after=$CHECKOUT [--postgres] [--redis] [--rounds 3]

Run it from a folder that is not a checkout: `python -m` puts the current folder first
on the import path, before PYTHONPATH. Each server runs the tree given
(`PYTHONPATH`); the report gives each its median exchanges/s, its share of the floor and
its CPU per exchange: the worker's own, and with the processes it started (the SQLite
writer). CPU per exchange moves less than throughput on a busy machine."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tools.bench.harness import Bench, BenchOptions, wait_idle
from tools.bench.load import LoadResult, Slot, run_wrk
from tools.bench.postgres import ThrowawayPostgres
from tools.bench.processes import ServerProcess, cpu_seconds
from tools.bench.redis_server import ThrowawayRedis
from tools.bench.results import median

CLIENTS = 50


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.ab", description=__doc__)
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a chatmeter checkout")
    parser.add_argument("--postgres", action="store_true", help="on PostgreSQL too")
    parser.add_argument("--redis", action="store_true", help="on SQLite + Redis too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help="1: one exchange at a time (latency)"
    )
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatmeter-ab-"))
    bench = Bench(BenchOptions(quick=True), workdir, lambda message: None)
    postgres = ThrowawayPostgres() if options.postgres else None
    redis = ThrowawayRedis() if options.redis else None
    try:
        if postgres is not None:
            postgres.start()
        if redis is not None:
            redis.start()
        servers = {"floor": bench.start_floor()}
        for spec in options.trees:
            name, tree = spec.split("=", 1)
            os.environ["PYTHONPATH"] = str(Path(tree).resolve())
            servers[f"{name} sqlite"] = bench.start_chatmeter(f"{name}-sq", bench.sqlite_url(name))
            if postgres is not None:
                postgres.createdb(name)
                servers[f"{name} pg"] = bench.start_chatmeter(f"{name}-pg", postgres.url(name))
            if redis is not None:
                servers[f"{name} redis"] = bench.start_chatmeter(
                    f"{name}-redis",
                    bench.sqlite_url(f"{name}-redis"),
                    {"CHATMETER_REDIS_URL": redis.url},
                )
        os.environ.pop("PYTHONPATH", None)
        measure(bench, servers, options.rounds, options.seconds, options.clients)
    finally:
        bench.stop_all()
        if postgres is not None:
            postgres.stop()
        if redis is not None:
            redis.cleanup()


def measure(
    bench: Bench,
    servers: dict[str, ServerProcess],
    rounds: int,
    seconds: float,
    clients: int = CLIENTS,
) -> None:
    slots: dict[str, list[Slot]] = {}
    for name, server in servers.items():
        slots[name] = bench.slots(server, "bench", clients)
        run_wrk(server, slots[name], seconds=2, workdir=bench.workdir)  # warm up
    results: dict[str, list[tuple[LoadResult, float]]] = {name: [] for name in servers}
    for index in range(rounds):
        for name, server in servers.items():
            wait_idle(server)
            own = cpu_seconds(server.process.pid)
            result = run_wrk(server, slots[name], seconds=seconds, workdir=bench.workdir)
            worker_ms = (cpu_seconds(server.process.pid) - own) * 1000 / max(1, result.exchanges)
            results[name].append((result, worker_ms))
            print(
                f"round {index + 1} {name:>16}: {result.throughput:8,.0f}/s, "
                f"p50 {result.p50_ms:.2f} ms, "
                f"CPU {result.server_cpu_ms_per_exchange:.3f} ms per exchange "
                f"(worker {worker_ms:.3f}), failures {result.failures}",
                flush=True,
            )
    floor = median([r.throughput for r, _ in results["floor"]])
    for name, rows in results.items():
        rate = median([r.throughput for r, _ in rows])
        cpu = median([r.server_cpu_ms_per_exchange for r, _ in rows])
        worker = median([w for _, w in rows])
        p50 = median([r.p50_ms for r, _ in rows])
        print(
            f"{name:>16}: median {rate:8,.0f}/s, {rate / floor:6.1%} of the floor, "
            f"p50 {p50:.2f} ms, "
            f"CPU {cpu:.3f} ms per exchange (worker {worker:.3f})"
        )


if __name__ == "__main__":
    main()
