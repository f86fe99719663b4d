"""A client run inside the container's network namespace (`nsenter --net`), where the
server listens on 127.0.0.1:8000. `ready`: wait for /readyz. `chat --token T`: create a
chat and stream one reply. Prints what it saw as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx

from tests.support.sse import stream_message

BASE_URL = "http://127.0.0.1:8000"


async def ready(within: float) -> dict[str, Any]:
    """The status of /readyz once it answers 200, or its last answer at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    status, body = 0, ""
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=10) as client:
        while loop.time() < deadline:
            try:
                answer = await client.get("/readyz")
                status, body = answer.status_code, answer.text
            except httpx.TransportError as exc:
                status, body = 0, repr(exc)
            if status == 200:
                break
            await asyncio.sleep(0.2)
    return {"status": status, "body": body}


async def chat(token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=120) as client:
        created = await client.post("/api/chat", json={"title": "container"}, headers=headers)
        if created.status_code != 201:
            return {"created": created.status_code, "body": created.text}
        chat_id = created.json()["chat_id"]
        result = await stream_message(client, chat_id, "Say hello in five words.", token)
        usage = await client.get("/api/usage", headers=headers)
        return {
            "created": created.status_code,
            "status": result.status,
            "body": result.body,
            "events": result.events,
            "text": result.text,
            "usage": usage.json(),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ready").add_argument("--within", type=float, default=180)
    commands.add_parser("chat").add_argument("--token", required=True)
    args = parser.parse_args()
    work = ready(args.within) if args.command == "ready" else chat(args.token)
    print(json.dumps(asyncio.run(work)))


if __name__ == "__main__":
    main()
