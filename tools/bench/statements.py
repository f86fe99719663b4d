"""SQL statements per exchange, counted below whatever layer chatmeter talks to its
database through (SQLAlchemy, aiosqlite, sqlite3 or asyncpg directly):

- SQLite: every connection made while counting gets sqlite3's trace callback, which
  SQLite calls with each statement it runs (chatmeter runs in this process for that;
  nothing is timed here), and the SQLite writer process writes its statements to a
  file (the `sqlite_trace_file` setting);
- PostgreSQL: the server's own `pg_stat_statements` (the throwaway server preloads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chatmeter.auth.tokens import mint_token
from chatmeter.config import load_settings
from tools.bench.load import BENCH_MESSAGE

WARM_UP_EXCHANGES = 3
_OUR_QUERIES = ("pg_stat_statements", "pg_database")


@dataclass
class StatementCount:
    database: str
    exchanges: int
    statements: Counter[str] = field(default_factory=Counter)  # kind -> count

    @property
    def per_exchange(self) -> float:
        return sum(self.statements.values()) / self.exchanges

    @property
    def commits_per_exchange(self) -> float:
        return self.statements["COMMIT"] / self.exchanges


def statement_kind(statement: str) -> str:
    """`SELECT chats`, `INSERT messages`, `UPDATE user_usage`, `BEGIN`, `COMMIT`..."""
    words = statement.replace("(", " ( ").replace(";", " ").split()
    if not words:
        return "?"
    verb = words[0].upper()
    upper = [w.upper() for w in words]
    target = None
    if verb == "INSERT" and "INTO" in upper:
        target = words[upper.index("INTO") + 1]
    elif verb in ("SELECT", "DELETE") and "FROM" in upper:
        target = words[upper.index("FROM") + 1]
    elif verb == "UPDATE" and len(words) > 1:
        target = words[1]
    if verb in ("BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"):
        return "COMMIT" if verb == "END" else verb
    return f"{verb} {target.strip(chr(34))}" if target else verb


@contextlib.contextmanager
def traced_sqlite(on_statement: Callable[[str], None]) -> Iterator[None]:
    """Every sqlite3 connection opened meanwhile reports its statements."""
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = original(*args, **kwargs)
        conn.set_trace_callback(on_statement)
        return conn

    sqlite3.connect = cast(Any, connect)
    try:
        yield
    finally:
        sqlite3.connect = original


async def _run_exchanges(
    config: Path, database_url: str, exchanges: int, start: Any, trace: Path | None = None
) -> None:
    """Warm up, call `await start()`, then run `exchanges` exchanges one at a time; the
    SQLite writer process appends its statements to `trace`."""
    from chatmeter.app import create_app

    secret = "statement-count-secret-" + "x" * 24
    settings = load_settings(
        {"CHATMETER_CONFIG": str(config)},
        database_url=database_url,
        jwt_secret=secret,
        default_token_limit=10**15,
        sqlite_trace_file=str(trace) if trace else None,
    )
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {mint_token(secret, 'statement-count')}"}
    transport = httpx.ASGITransport(app=app)
    async with (
        app.api.router.lifespan_context(app.api),
        httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as client,
    ):
        answer = await client.post("/api/chat", json={"model": "bench"})
        path = f"/api/chat/{answer.json()['chat_id']}/message"
        for index in range(WARM_UP_EXCHANGES + exchanges):
            if index == WARM_UP_EXCHANGES:
                await start()
            answer = await client.post(path, json={"message": BENCH_MESSAGE})
            if b'"done":true' not in answer.content:
                raise RuntimeError(f"an exchange did not end: {answer.text[-300:]}")


def count_sqlite(config: Path, database_url: str, exchanges: int = 20) -> StatementCount:
    count = StatementCount("SQLite", exchanges)
    counting = False
    trace = Path(tempfile.mkdtemp()) / "writer.sql"
    trace.touch()
    writer_lines_before = 0

    def on_statement(statement: str) -> None:
        # "--": inside a trigger; PRAGMA: the writer's idle checkpoint, not an exchange's
        if counting and not statement.startswith(("--", "PRAGMA")):
            count.statements[statement_kind(statement)] += 1

    async def start() -> None:
        nonlocal counting, writer_lines_before
        counting = True
        writer_lines_before = len(trace.read_text().splitlines())

    with traced_sqlite(on_statement):
        asyncio.run(_run_exchanges(config, database_url, exchanges, start, trace))
    for statement in trace.read_text().splitlines()[writer_lines_before:]:
        on_statement(statement)
    shutil.rmtree(trace.parent, ignore_errors=True)
    return count


async def _pg_rows(engine: AsyncEngine, *statements: str) -> list[tuple[Any, ...]]:
    """Run `statements` (autocommit: no BEGIN or COMMIT of ours is counted); the rows of
    the last."""
    rows: list[tuple[Any, ...]] = []
    async with engine.connect() as conn:
        for statement in statements:
            result = await conn.execute(sa.text(statement))
            rows = [tuple(row) for row in result.all()] if result.returns_rows else []
    return rows


def count_postgres(config: Path, database_url: str, exchanges: int = 20) -> StatementCount:
    """Needs a server started with `shared_preload_libraries=pg_stat_statements`."""
    count = StatementCount("PostgreSQL", exchanges)

    async def measure() -> None:
        # one connection of ours, opened before the reset: its own set-up is not counted
        engine = create_async_engine(database_url, pool_size=1, isolation_level="AUTOCOMMIT")
        try:

            async def start() -> None:
                await _pg_rows(
                    engine,
                    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
                    "SELECT pg_stat_statements_reset()",
                )

            await _run_exchanges(config, database_url, exchanges, start)
            rows = await _pg_rows(
                engine,
                "SELECT query, calls FROM pg_stat_statements WHERE dbid = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())",
            )
        finally:
            await engine.dispose()
        for query, calls in rows:
            if not any(ours in query for ours in _OUR_QUERIES):
                count.statements[statement_kind(query)] += calls

    asyncio.run(measure())
    return count
