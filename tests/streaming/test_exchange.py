"""The exchange end to end over real HTTP against the scripted provider."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import auth, make_settings, scripted, token_for
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message


async def new_chat(client: httpx.AsyncClient, user: str, **body: str) -> str:
    response = await client.post("/api/chat", json=body, headers=auth(user))
    assert response.status_code == 201, response.text
    return str(response.json()["chat_id"])


async def test_reply_streams_and_is_metered(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    chat_id = await new_chat(client, "alice")
    result = await stream_message(client, chat_id, "Hi!", token_for("alice"))
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.text == "Hello there, this is a scripted reply."
    assert len(result.chunks) == 4
    assert result.ids == list(range(1, len(result.events) + 1))
    end = result.last
    # the first event names the reply (SPEC section 11), the end event names it again
    assert result.first == {
        "chunk": "",
        "done": False,
        "message_id": end["message_id"],
        "user_message_id": end["user_message_id"],
    }
    assert end["done"] is True and end["chunk"] == ""
    assert end["finish_reason"] == "stop"
    usage = end["usage"]
    assert usage["source"] == "provider"
    # scripted: ceil(len/4) per prompt text (system prompt, message) and the reply
    system = server.services.settings.system_prompt_for("scripted")
    expected_prompt = -(-len(system) // 4) + -(-len("Hi!") // 4)
    assert usage["prompt_tokens"] == expected_prompt
    assert usage["completion_tokens"] == -(-len(result.text) // 4)
    assert (
        end["tokens_used"] == usage["total_tokens"] == expected_prompt + usage["completion_tokens"]
    )

    chat = (await client.get(f"/api/chat/{chat_id}", headers=auth("alice"))).json()
    roles = [(m["role"], m["content"], m["status"]) for m in chat["messages"]]
    assert roles == [("user", "Hi!", "complete"), ("assistant", result.text, "complete")]
    assert chat["messages"][1]["message_id"] == end["message_id"]
    assert chat["messages"][0]["message_id"] == end["user_message_id"]
    assert chat["messages"][1]["tokens_consumed"] == end["tokens_used"]
    # time-ordered ids (UUIDv7), the user's message first: index pages stay few per commit
    ids = [uuid.UUID(end["user_message_id"]), uuid.UUID(end["message_id"])]
    assert [i.version for i in ids] == [7, 7]
    assert ids[0].int >> 80 <= ids[1].int >> 80

    usage_now = (await client.get("/api/usage", headers=auth("alice"))).json()
    assert usage_now["total_tokens_used"] == end["tokens_used"]
    assert usage_now["reserved_tokens"] == 0
    events = (await client.get("/api/usage/events", headers=auth("alice"))).json()["events"]
    assert [e["total_tokens"] for e in events] == [end["tokens_used"]]


async def test_long_non_ascii_message_is_counted_before_refused(database_url: str) -> None:
    small = scripted(reply="ok", context_window=200, max_output_tokens=50)
    async with serve(make_settings(database_url, models={"small": small})) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "nia", model="small")
            # 300 UTF-8 bytes: past the cheap bound, but 38 tokens by the model's count
            fits = await stream_message(client, chat_id, "é" * 150, token_for("nia"))
            assert fits.status == 200 and fits.last["done"] is True
            # 250 tokens by the model's count: it really does not fit in 200
            too_long = await stream_message(client, chat_id, "é" * 1000, token_for("nia"))
            assert too_long.status == 400 and too_long.body["code"] == "INVALID_MESSAGE"
            chat = (await client.get(f"/api/chat/{chat_id}", headers=auth("nia"))).json()
            assert [m["content"] for m in chat["messages"] if m["role"] == "user"] == ["é" * 150]
