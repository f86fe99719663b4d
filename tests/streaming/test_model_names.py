"""A model's name is the operator's to choose (SPEC section 2): a name such as Ollama's
`llama3:instruct` serves chats like any other, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import httpx

from tests.conftest import make_settings, scripted, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.server import serve
from tests.support.sse import stream_message


async def test_a_model_named_with_a_colon_and_a_tag_serves_its_chats(database_url: str) -> None:
    models = {"llama3:instruct": scripted(reply="Tagged and answering.", chunks=2)}
    async with serve(make_settings(database_url, models=models)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat_id = await new_chat(client, "tess", model="llama3:instruct")
            result = await stream_message(client, chat_id, "Hello?", token_for("tess"))
            assert result.status == 200, result.body
            assert result.text == "Tagged and answering."
            assert result.last["done"] is True
            # and the chat of the default model, whose opening names every model too
            other = await new_chat(client, "tess")
            plain = await stream_message(client, other, "Hello?", token_for("tess"))
            assert plain.status == 200, plain.body
            assert plain.last["done"] is True
