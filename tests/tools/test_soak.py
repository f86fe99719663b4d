"""The randomized reliability trial of issue 7, small enough for every `make test`:
120 exchanges on 2 workers on PostgreSQL with random client disconnects, stops and
upstream drops; then every exchange has its rows, the ledger equals the totals, nothing
stays reserved and nothing is billed twice. `make soak` runs the 1,000-trial version.

CHATMETER_SOAK_SEED replays a seed (each run draws a new one and prints it);
CHATMETER_SOAK_TRIALS changes the number of trials."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import pytest

from tests.conftest import BACKENDS
from tests.support.postgres import PostgresServer
from tools.soak.plan import SoakConfig
from tools.soak.trial import run_soak

pytestmark = pytest.mark.skipif(
    "postgres" not in BACKENDS, reason="the soak runs on PostgreSQL (CHATMETER_TEST_BACKENDS)"
)


async def test_soak_keeps_the_books(
    postgres: PostgresServer, postgres_template: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHATMETER_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    trials = int(os.environ.get("CHATMETER_SOAK_TRIALS") or 120)
    print(f"soak seed {seed} ({trials} trials; replay with CHATMETER_SOAK_SEED={seed})")
    name = f"soak_{uuid.uuid4().hex[:12]}"
    postgres.createdb(name, postgres_template)
    url = postgres.url(name)
    config = SoakConfig(trials=trials, seed=seed, time_limit=45.0)
    report = await run_soak(url, tmp_path, config, command="pytest tests/tools/test_soak.py")
    assert report.ran == trials, f"seed {seed}: only {report.ran} of {trials} trials ran"
    assert report.passed, f"seed {seed}, see {tmp_path}/trials.jsonl:\n" + report.markdown()
