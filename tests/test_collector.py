"""A server process collects the young generation less often; a host's collector is left
alone by the app it builds itself."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatmeter.app import create_app, create_app_from_env
from chatmeter.collector import YOUNG_GENERATION_THRESHOLD
from tests.conftest import make_settings


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    """The collector's thresholds as they were, put back after the test."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield before
    gc.set_threshold(*before)


def test_the_app_a_worker_builds_collects_the_young_generation_less_often(
    thresholds: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHATMETER_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/c.db")
    create_app_from_env()
    assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, 10, 10)


def test_an_app_built_in_process_leaves_the_hosts_collector_alone(
    thresholds: tuple[int, int, int], tmp_path: Path
) -> None:
    create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path}/c.db"))
    assert gc.get_threshold() == (700, 10, 10)
