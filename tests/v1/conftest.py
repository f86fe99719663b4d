"""The `/v1` tests' server: scripted models, a user with an API key, the official SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from openai import AsyncOpenAI

from tests.conftest import auth, make_settings, scripted
from tests.support.server import RunningServer, serve

REPLY = "Hello there, this is a scripted reply."
SLOW_REPLY = " ".join(f"w{i}" for i in range(40))


@dataclass
class V1:
    server: RunningServer
    http: httpx.AsyncClient
    sdk: AsyncOpenAI
    key: str
    user: str


async def new_key(http: httpx.AsyncClient, user: str) -> str:
    response = await http.post("/api/keys", json={"name": "sdk"}, headers=auth(user))
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def sdk_for(server: RunningServer, key: str) -> AsyncOpenAI:
    # no retries: each request is one exchange the test accounts for
    return AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
async def v1(database_url: str) -> AsyncIterator[V1]:
    settings = make_settings(
        database_url,
        models={
            "scripted": scripted(reply=REPLY, chunks=4),
            "slow": scripted(reply=SLOW_REPLY, chunks=40, delay_ms=20, max_output_tokens=500),
        },
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            key = await new_key(http, "olga")
            async with sdk_for(server, key) as sdk:
                yield V1(server, http, sdk, key, "olga")
