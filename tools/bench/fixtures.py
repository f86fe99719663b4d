"""Clients made before the clock starts: one user (own token) and one chat per client."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from chatmeter.auth.tokens import mint_token
from tools.bench.floor import floor_path
from tools.bench.load import Slot

TOKEN_TTL_SECONDS = 6 * 3600
SETUP_CONCURRENCY = 16


def message_path(chat_id: str) -> str:
    return f"/api/chat/{chat_id}/message"


async def chatmeter_slots(
    base_url: str, secret: str, model: str, count: int, prefix: str
) -> list[Slot]:
    """`count` users, each with a chat of `model` on the server at `base_url`.
    Budgets come from the server's CHATMETER_DEFAULT_TOKEN_LIMIT (set huge)."""
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)
    run = uuid.uuid4().hex[:6]

    async def one(client: httpx.AsyncClient, index: int) -> Slot:
        token = mint_token(secret, f"{prefix}-{run}-{index}", ttl_seconds=TOKEN_TTL_SECONDS)
        async with limit:
            answer = await client.post(
                "/api/chat",
                json={"model": model, "title": f"bench {index}"},
                headers={"Authorization": f"Bearer {token}"},
            )
        if answer.status_code != 201:
            raise RuntimeError(f"creating a chat failed: {answer.status_code} {answer.text}")
        chat_id = answer.json()["chat_id"]
        return Slot(chat_id, message_path(chat_id), token)

    limits = httpx.Limits(max_connections=SETUP_CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def floor_slots(secret: str, model: str, count: int) -> list[Slot]:
    """The floor's clients send the same request (a token of the same size, ignored)."""
    slots = []
    for index in range(count):
        chat_id = str(uuid.uuid4())
        token = mint_token(secret, f"floor-{index}", ttl_seconds=TOKEN_TTL_SECONDS)
        slots.append(Slot(chat_id, floor_path(model, chat_id), token))
    return slots
