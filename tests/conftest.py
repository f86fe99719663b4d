"""Fixtures: every API test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.auth.tokens import mint_token
from chatmeter.config import ModelConfig, Settings
from chatmeter.db.engine import make_engine
from chatmeter.db.migrate import upgrade
from chatmeter.db.transactor import Transactor, make_transactor
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.server import RunningServer, serve

TEST_SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
BACKENDS = [b for b in os.environ.get("CHATMETER_TEST_BACKENDS", "sqlite,postgres").split(",") if b]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite database of the test's own, copied from the session's template."""
    path = tmp_path / "chatmeter.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresServer) -> str:
    postgres.createdb("chatmeter_template")
    upgrade(postgres.url("chatmeter_template"))
    return "chatmeter_template"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database for one test."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "chatmeter.db"
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    template_name: str = request.getfixturevalue("postgres_template")
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, template_name)
    return postgres.url(name)


def scripted(**fields: Any) -> ModelConfig:
    return ModelConfig(provider="scripted", **fields)


def make_settings(database_url: str, **overrides: Any) -> Settings:
    models = {
        "scripted": scripted(reply="Hello there, this is a scripted reply.", chunks=4),
        **overrides.pop("models", {}),
    }
    values: dict[str, Any] = {
        "database_url": database_url,
        "jwt_secret": TEST_SECRET,
        "default_model": "scripted",
        "models": models,
        "ping_interval_seconds": 15.0,
        **overrides,
    }
    return Settings.model_validate(values)


@pytest.fixture
def settings_factory(database_url: str) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        return make_settings(database_url, **overrides)

    return build


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    async with serve(make_settings(database_url)) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


def token_for(user_id: str, **kwargs: Any) -> str:
    return mint_token(TEST_SECRET, user_id, **kwargs)


def auth(user_id: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user_id, **kwargs)}"}


@pytest.fixture
async def transactor(database_url: str) -> AsyncIterator[Transactor]:
    """The transactor the server would run, on a fresh database: steps run through it."""
    running = make_transactor(database_url, 30_000)
    await running.start()
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def audit_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The test's own look at the database, through SQLAlchemy Core and the tables' types."""
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()
