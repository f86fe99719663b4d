"""Run the Alembic migrations programmatically (`chatmeter db upgrade`, tests, make run)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from alembic import command
from alembic.config import Config

from chatmeter.config import DEFAULT_PLAN

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str, default_plan: str = DEFAULT_PLAN) -> Config:
    """The migrations' configuration; `default_plan` is the configured
    CHATMETER_DEFAULT_PLAN, which migration 0005 reads."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["default_plan"] = default_plan
    return config


def upgrade(url: str, revision: str = "head", default_plan: str = DEFAULT_PLAN) -> None:
    """Bring the database at `url` to `revision`. Blocking. The migrations run on an
    event loop of their own, so from inside a running loop they run in a thread."""
    config = alembic_config(url, default_plan)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        command.upgrade(config, revision)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(command.upgrade, config, revision).result()
