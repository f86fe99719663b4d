"""The test session's throwaway PostgreSQL 15 server: the benchmark's, tuned for tests."""

from __future__ import annotations

from tools.bench.postgres import ThrowawayPostgres
from tools.bench.processes import free_port

__all__ = ["PostgresServer", "free_port"]


class PostgresServer(ThrowawayPostgres):
    # a test database is thrown away: no need to survive a crash of the machine
    options = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    options += "-c max_connections=300"
