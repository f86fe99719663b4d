"""Transactions on the message path written once, run by two fast drivers.

A transaction is a generator of `Sql` statements (plain SQL with `:name` parameters, the
subset SQLite and PostgreSQL share: RETURNING, ON CONFLICT DO NOTHING). Each `yield`
hands a statement to the driver and receives its `Rows`. The logic (checks, the
conditional reservation, settlement) is one readable function; a driver only moves
statements and values:

- SQLite: the whole transaction runs in the SQLite writer process
  (`sqlite_process.py`), on the `sqlite3` connection it owns;
- PostgreSQL: asyncpg directly, prepared statements. A statement marked `alone` (whole
  on its own: a read, or data-modifying CTEs that do one transaction's writes in one
  statement) runs without BEGIN and COMMIT while no transaction has begun: an opening
  and a settlement are then one round trip each. The first statement not so marked begins
  the transaction that the rest runs in.

The ORM-free, driver-direct path is what the message path needs: through SQLAlchemy's
async layer each statement cost a thread hop (aiosqlite) or a greenlet switch plus
statement processing, about 0.5 ms of CPU per statement; here it is tens of microseconds.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from types import MappingProxyType
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sql:
    text: str
    params: Mapping[str, object]
    # atomic by itself: PostgreSQL runs it outside a transaction if none has begun yet,
    # and a unique violation is thrown into the steps as `Conflict` (nothing was written)
    alone: bool = False
    # the parameter whose value each row it returns begins with (if it returns any): it
    # tells apart the rows of statements sent together (`Transactor.run_together`, which
    # sends no other statement with others)
    keyed_by: str = ""
    # reads much of a table (a report, a search): PostgreSQL may plan it with the
    # sequential and bitmap scans that chatmeter's connections otherwise leave out
    # (`pg_connections.PLANNER_SETTINGS`); it then runs in a transaction of its own
    wide: bool = False


class Conflict(Exception):
    """A statement marked `alone` broke a unique constraint and wrote nothing."""


# What a statement returned. Statements whose effect must be known say RETURNING, so
# "how many rows changed" is the number of rows returned, on both drivers.
Rows = list[tuple[Any, ...]]

Steps = Generator[Sql, Rows, T]


# SQLite: values stored the way SQLAlchemy stores them (its types read them back)


def _sqlite_time(value: datetime) -> str:
    """'YYYY-MM-DD HH:MM:SS.ffffff' in UTC, as SQLAlchemy writes it (isoformat is C-fast;
    the offset it appends is cut)."""
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    return utc.isoformat(" ", "microseconds")[:26]


# the values SQLite does not store as they are, by their exact type (a lookup, not a
# chain of isinstance, per parameter: the writer converts some 70 per exchange)
_SQLITE_FORMS: Mapping[type, Callable[[Any], object]] = MappingProxyType(
    {uuid.UUID: attrgetter("hex"), datetime: _sqlite_time, bool: int}
)


def sqlite_value(value: object) -> object:
    form = _SQLITE_FORMS.get(type(value))
    return value if form is None else form(value)


def sqlite_params(params: Mapping[str, object]) -> dict[str, object]:
    return {name: sqlite_value(value) for name, value in params.items()}


def run_sqlite(conn: Any, steps: Steps[T]) -> T:
    """Drive `steps` on a sqlite3 connection (in the thread that owns it)."""
    try:
        statement = next(steps)
        while True:
            cursor = conn.execute(statement.text, sqlite_params(statement.params))
            statement = steps.send(cursor.fetchall())
    except StopIteration as done:
        result: T = done.value
        return result


# PostgreSQL (asyncpg): positional parameters, native types

# a `:name` parameter, or a string constant, which is passed over as it is: the
# opening writes the configured models' names into its statement, and one such as
# Ollama's `llama3:instruct` is not a parameter (E'...' is the escaped form, `_literal`)
_NAMED = re.compile(
    r"(?<![A-Za-z0-9_])[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|(?<!:):([A-Za-z_][A-Za-z0-9_]*)"
)


@dataclass(frozen=True, slots=True)
class _Positional:
    text: str
    names: tuple[str, ...]


class PostgresStatements:
    """`:name` statements rewritten to asyncpg's `$n`, once per statement text."""

    def __init__(self) -> None:
        self._cache: dict[str, _Positional] = {}

    def convert(self, statement: Sql) -> tuple[str, list[object]]:
        positional = self._cache.get(statement.text)
        if positional is None:
            names: list[str] = []

            def number(match: re.Match[str]) -> str:
                name = match.group(1)
                if name is None:  # a string constant
                    return match.group(0)
                if name not in names:
                    names.append(name)
                return f"${names.index(name) + 1}"

            positional = _Positional(_NAMED.sub(number, statement.text), tuple(names))
            self._cache[statement.text] = positional
        return positional.text, [statement.params[name] for name in positional.names]


# what a `wide` statement is planned with: PostgreSQL's defaults, for its transaction
WIDE_READ_SETTINGS = "SET LOCAL enable_seqscan = on; SET LOCAL enable_bitmapscan = on"


async def run_asyncpg(
    conn: Any, statements: PostgresStatements, steps: Steps[T], first: Sql | None = None
) -> T:
    """Drive `steps` on an asyncpg connection: statements marked `alone` on their own
    until one is not, then a transaction for the rest, committed when the steps end
    (rolled back if they raise). `first`: the steps' first statement, when it was taken
    already."""
    async with contextlib.AsyncExitStack() as transaction:
        began = widened = False
        try:
            statement = next(steps) if first is None else first
            while True:
                if not began and (statement.wide or not statement.alone):
                    await transaction.enter_async_context(conn.transaction())
                    began = True
                if statement.wide and not widened:
                    await conn.execute(WIDE_READ_SETTINGS)  # until the transaction ends
                    widened = True
                text, args = statements.convert(statement)
                try:
                    records = await conn.fetch(text, *args)
                except asyncpg.UniqueViolationError as exc:
                    if began:
                        raise  # the transaction is aborted: the steps cannot go on
                    statement = steps.throw(Conflict(str(exc)))
                    continue
                statement = steps.send([tuple(record) for record in records])
        except StopIteration as done:
            result: T = done.value
            return result
