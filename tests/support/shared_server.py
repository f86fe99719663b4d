"""One server per backend for a whole test module, for API tests that need no settings
of their own: starting a server per test costs more than most tests.

A module takes them with `backend, server, client = shared_server_fixtures()`; these
replace conftest's function-scoped fixtures of the same names in that module (conftest's
`database_url` then gives a fresh database of the module's backend to tests that build a
server of their own). Tests on a shared server keep apart by using users of their own:
`fresh("alice")`.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, make_settings
from tests.support.postgres import PostgresServer
from tests.support.server import RunningServer, serve


def fresh(name: str) -> str:
    """A user id no other test uses."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


def fresh_database_url(backend: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """A migrated database of its own, copied from the session's template."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = directory / "chatmeter.db"
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"m_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, template_name)
    return postgres.url(name)


def shared_server_fixtures(**overrides: Any) -> tuple[Any, Any, Any]:
    """Module-scoped `backend`, `server` and `client` fixtures; `overrides` go to
    `make_settings`."""

    @pytest.fixture(scope="module", params=BACKENDS, name="backend")
    def backend(request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(scope="module", name="server")
    async def server(
        backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> AsyncIterator[RunningServer]:
        url = fresh_database_url(backend, request, tmp_path_factory.mktemp(backend))
        async with serve(make_settings(url, **overrides)) as running:
            yield running

    @pytest.fixture(scope="module", name="client")
    async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield http

    return backend, server, client
