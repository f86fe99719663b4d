"""Read a chatmeter event stream the way a client does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    events: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    body: Any = None

    @property
    def chunks(self) -> list[str]:
        """The pieces of the reply (not the first event, which names the reply)."""
        return [e["chunk"] for e in self.events if is_piece(e)]

    @property
    def first(self) -> dict[str, Any]:
        return self.events[0]

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]


def is_piece(event: dict[str, Any]) -> bool:
    return not event.get("done") and not event.get("error") and "message_id" not in event


async def parse_events(
    lines: AsyncIterator[str], result: StreamResult
) -> AsyncIterator[dict[str, Any]]:
    event_id: int | None = None
    data: list[str] = []
    async for line in lines:
        if line.startswith(":"):
            result.comments.append(line)
        elif line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            event = json.loads("\n".join(data))
            result.events.append(event)
            if event_id is not None:
                result.ids.append(event_id)
            data, event_id = [], None
            yield event


async def stream_message(
    client: httpx.AsyncClient,
    chat_id: str,
    message: str,
    token: str,
    *,
    stop_after: int = 0,
) -> StreamResult:
    """POST a message and read the whole stream (or leave after `stop_after` chunks)."""
    headers = {"Authorization": f"Bearer {token}"}
    url = f"/api/chat/{chat_id}/message"
    async with client.stream("POST", url, json={"message": message}, headers=headers) as resp:
        result = StreamResult(resp.status_code, resp.headers)
        if resp.status_code != 200:
            await resp.aread()
            result.body = resp.json()
            return result
        seen = 0
        async for event in parse_events(resp.aiter_lines(), result):
            seen += is_piece(event)
            if stop_after and seen >= stop_after:
                break
    return result
