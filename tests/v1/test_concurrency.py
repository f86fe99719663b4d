"""One budget for both doors: concurrent requests of one user through `/v1` and the chat
API together never pass the limit (one reservation statement holds both), and the books
balance afterwards. And a key revoked through one worker is refused by every worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
from openai import AsyncOpenAI

from tests.conftest import TEST_SECRET, auth, make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.db import books
from tests.support.process import chatmeter_process
from tests.support.server import serve
from tests.support.sse import stream_message
from tests.v1.conftest import new_key, sdk_for

REPLY = " ".join(f"t{i}" for i in range(30))


async def test_v1_and_the_chat_api_together_never_pass_the_limit(database_url: str) -> None:
    settings = make_settings(
        database_url,
        models={"scripted": scripted(reply=REPLY, chunks=10, delay_ms=10, max_output_tokens=40)},
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            admin = auth("root", admin=True)
            limit = 1_000
            await http.put("/api/admin/users/wes/limit", json={"token_limit": limit}, headers=admin)
            key = await new_key(http, "wes")
            chats = [await new_chat(http, "wes") for _ in range(6)]
            async with sdk_for(server, key) as sdk:

                async def by_v1(stream: bool) -> str:
                    try:
                        if stream:
                            chunks = await sdk.chat.completions.create(
                                model="scripted",
                                messages=[{"role": "user", "content": "go"}],
                                stream=True,
                            )
                            async for _ in chunks:
                                pass
                        else:
                            await sdk.chat.completions.create(
                                model="scripted", messages=[{"role": "user", "content": "go"}]
                            )
                    except openai.RateLimitError as exc:
                        assert exc.code == "insufficient_quota"
                        return "refused"
                    return "ok"

                async def by_chat(chat_id: str) -> str:
                    result = await stream_message(http, chat_id, "go", token_for("wes"))
                    if result.status == 403:
                        assert result.body["code"] == "TOKEN_BUDGET_EXCEEDED"
                        return "refused"
                    assert result.last.get("done"), result.last
                    return "ok"

                outcomes = await asyncio.gather(
                    *(by_v1(n % 2 == 0) for n in range(18)), *(by_chat(c) for c in chats)
                )
        state = await books(server.engine, "wes")
    assert "refused" in outcomes and "ok" in outcomes  # the limit was reached
    assert state.total <= limit
    assert state.total == state.ledger
    assert state.reserved == 0 and state.open_reservations == 0


TOML = """
default_model = "scripted"

[models.scripted]
provider = "scripted"
reply = "Hello from every worker."
"""


async def test_a_revoked_key_is_refused_by_every_worker(database_url: str, tmp_path: Path) -> None:
    with chatmeter_process(database_url, TEST_SECRET, TOML, tmp_path, workers=2) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            made = await http.post("/api/keys", json={"name": "w"}, headers=auth("xia"))
            key, key_id = made.json()["key"], made.json()["key_id"]

        async def fresh_client_completion() -> int:
            # a client of its own: a connection of its own, spread over the workers
            async with AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as sdk:
                try:
                    await sdk.chat.completions.create(
                        model="scripted", messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.AuthenticationError:
                    return 401
                return 200

        before = [await fresh_client_completion() for _ in range(8)]
        assert before == [200] * 8
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            gone = await http.delete(f"/api/keys/{key_id}", headers=auth("xia"))
            assert gone.status_code == 204
        after = [await fresh_client_completion() for _ in range(12)]
        assert after == [401] * 12
