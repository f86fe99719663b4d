"""The OpenAI JavaScript SDK (npm `openai`, run with Debian's Node) streaming a
completion through chatmeter: it parses SSE its own way, and it is what web products use.
The package is installed into tests/v1/js/node_modules (git-ignored) on first run."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from chatmeter.providers.scripted import scripted_count
from tests.support.db import books, ledger_row
from tests.v1.conftest import REPLY, V1
from tests.v1.test_completions import exchange_id

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    npm = shutil.which("npm")
    if not found or not npm:
        pytest.fail("node and npm are needed: `apt-get install nodejs npm` (`make test-deps`)")
    if not (JS / "node_modules" / "openai" / "package.json").exists():
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            check=True,
            timeout=600,
        )
    return found


async def test_the_js_sdk_streams_a_completion(v1: V1, node: str) -> None:
    process = await asyncio.create_subprocess_exec(
        node,
        "stream.mjs",
        "scripted",
        cwd=JS,
        env={"CHATMETER_V1": v1.server.url + "/v1", "CHATMETER_KEY": v1.key, "PATH": "/usr/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    seen = json.loads(out)
    assert seen["text"] == REPLY
    assert seen["finish"] == "stop"
    prompt = scripted_count("Be brief.") + scripted_count("Say hello from JavaScript.")
    assert seen["usage"]["prompt_tokens"] == prompt
    assert seen["usage"]["completion_tokens"] == scripted_count(REPLY)
    assert seen["usage"]["total_tokens"] == prompt + scripted_count(REPLY)
    assert seen["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert seen["refused"] == {"status": 401, "code": "invalid_api_key"}
    (completion_id,) = seen["ids"]
    row = await ledger_row(v1.server.engine, exchange_id(completion_id))
    assert row is not None and row.total_tokens == seen["usage"]["total_tokens"]
    state = await books(v1.server.engine, "olga")
    assert state.total == state.ledger and state.reserved == 0
