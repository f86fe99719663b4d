"""Statements are counted below the drivers, whichever layer chatmeter uses."""

from __future__ import annotations

from pathlib import Path

from chatmeter.db.migrate import upgrade
from tools.bench.harness import config_toml
from tools.bench.statements import count_sqlite


def test_each_exchange_writes_two_messages_and_one_ledger_row(tmp_path: Path) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(config_toml())
    url = f"sqlite+aiosqlite:///{tmp_path / 'count.db'}"
    upgrade(url)
    count = count_sqlite(config, url, exchanges=5)
    assert count.statements["INSERT messages"] == 2 * 5
    assert count.statements["INSERT usage_events"] == 5
    assert count.commits_per_exchange >= 1
    assert count.per_exchange >= 5
