"""The embedded model end to end: a real SmolLM2 reply through llama.cpp, billed with
llama.cpp's exact usage; a stopped reply billed with its exact tokenizer counts."""

from __future__ import annotations

import httpx
import pytest

from chatmeter.config import ModelConfig
from chatmeter.metering.counting import counted_prompt
from chatmeter.providers.local import LocalProvider
from tests.conftest import auth, make_settings, token_for
from tests.streaming.test_exchange import new_chat
from tests.support.admin import set_token_limit
from tests.support.db import books, chat_rows
from tests.support.server import serve
from tests.support.sse import StreamResult, parse_events, stream_message

# one database is enough to show the model works; the exchange's database paths are
# covered on both backends by the scripted and Gemini tests
pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

LOCAL = ModelConfig(provider="local", model="SmolLM2-135M-Instruct", max_output_tokens=48)


async def test_local_model_reply_is_metered_exactly(database_url: str) -> None:
    settings = make_settings(database_url, models={"local": LOCAL}, default_model="local")
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            chat = await new_chat(client, "lena")
            result = await stream_message(client, chat, "Name three colours.", token_for("lena"))
            assert result.status == 200
            end = result.last
            assert end["done"] is True, end
            assert result.text.strip()
            assert len(result.chunks) > 1  # streamed in pieces, not at once
            usage = end["usage"]
            assert usage["source"] == "provider"
            assert 0 < usage["completion_tokens"] <= 48
            # llama.cpp's own prompt count equals its tokenizer on the templated prompt
            provider = await server.services.providers.get("local")
            system = settings.system_prompt_for("local")
            counts = await provider.count_tokens([system, "Name three colours."])
            assert usage["prompt_tokens"] >= sum(counts)
            assert usage["prompt_tokens"] <= sum(counts) + 20  # template markers only
            state = await books(server.engine, "lena")
            assert state.total == state.ledger == end["tokens_used"] and state.reserved == 0


async def test_stopping_the_local_model_bills_counted_tokens(database_url: str) -> None:
    long_answer = LOCAL.model_copy(update={"max_output_tokens": 400})
    settings = make_settings(database_url, models={"local": long_answer}, default_model="local")
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            chat = await new_chat(client, "mo")
            result = StreamResult(0, httpx.Headers())
            async with client.stream(
                "POST",
                f"/api/chat/{chat}/message",
                json={"message": "Write a long story about a dragon."},
                headers=auth("mo"),
            ) as response:
                async for event in parse_events(response.aiter_lines(), result):
                    if len(result.chunks) == 5 and not event.get("done"):
                        stop = await client.post(f"/api/chat/{chat}/stop", headers=auth("mo"))
                        assert stop.status_code == 202, (stop.text, result.text)
                    if event.get("done") or event.get("error"):
                        break
            end = result.last
            assert end["finish_reason"] == "stopped"
            assert end["usage"]["source"] == "counted"
            provider = await server.services.providers.get("local")
            (reply_tokens,) = await provider.count_tokens([result.text])
            assert end["usage"]["completion_tokens"] == reply_tokens
            rows = await chat_rows(server.engine, chat)
            assert rows[1].status == "stopped" and rows[1].content == result.text
            state = await books(server.engine, "mo")
            assert state.total == state.ledger == end["tokens_used"] and state.reserved == 0


async def test_the_local_model_gets_the_history_its_count_fits(database_url: str) -> None:
    """The prompt's byte bound keeps only the last turns of this chat in a 1,024-token
    context; counted with the model's tokenizer, all of them fit and are sent. llama.cpp's
    own count of the prompt is the templated count of the whole chat, and within what the
    opening reserved for it: the books balance."""
    small = LOCAL.model_copy(
        update={"context_window": 1024, "system_prompt": "Be brief.", "max_output_tokens": 16}
    )
    settings = make_settings(database_url, models={"local": small}, default_model="local")
    # the three questions alone pass the bound, whatever the sampled replies' lengths
    question = "Tell me, in a few words, about the colour {}. " + "I am asking because " * 16
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            chat = await new_chat(client, "noor")
            for colour in ("red", "green", "blue"):
                done = await stream_message(
                    client, chat, question.format(colour), token_for("noor")
                )
                assert done.last["done"] is True, done.last
            said = [(row.role, row.content) for row in await chat_rows(server.engine, chat)]
            last = await stream_message(client, chat, "And yellow?", token_for("noor"))
            assert last.last["done"] is True, last.last
            provider = await server.services.providers.get("local")
            assert isinstance(provider, LocalProvider)
            sizes = await provider.count_tokens([text for _, text in said])
            bound = sum(len(text.encode()) + 4 for _, text in said)
            assert bound > 1024 - 16 > sum(sizes) * 2, "the bound trims, the count does not"
            messages = [
                {"role": "system", "content": "Be brief."},
                *({"role": role, "content": text} for role, text in said),
                {"role": "user", "content": "And yellow?"},
            ]
            template = await provider._tokenizer.http.post(
                "/apply-template", json={"messages": messages}
            )
            whole = await provider.count_tokens([template.json()["prompt"]])
            assert last.last["usage"]["prompt_tokens"] == whole[0]
            state = await books(server.engine, "noor")
            assert state.total == state.ledger and state.reserved == 0


async def test_a_prompt_of_many_short_messages_never_passes_the_token_limit(
    database_url: str,
) -> None:
    # the reservation's bound of each message was its bytes plus 4 tokens, but SmolLM2's
    # chat template alone adds 5 to a user's message and 6 to an assistant's: 201 messages
    # of one letter were reserved 1,020 tokens and billed about 1,320, past a limit of 1,100
    settings = make_settings(database_url, models={"local": LOCAL}, default_model="local")
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(201)]
    request = {
        "model": "local",
        "messages": [{"role": "system", "content": "s"}, *turns],
        "max_tokens": 1,
    }
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            for user, limit in (("tight", 1100), ("roomy", 5000)):
                await set_token_limit(client, user, limit)
                answer = await client.post("/v1/chat/completions", json=request, headers=auth(user))
                state = await books(server.engine, user)
                assert state.total == state.ledger <= limit and state.reserved == 0, (
                    answer.status_code,
                    answer.text,
                )
                if limit == 5000:  # room for the real prompt: served, billed its size
                    assert answer.status_code == 200, answer.text
                    assert state.total == answer.json()["usage"]["total_tokens"] > 1100


async def test_a_request_its_bound_refused_is_served_when_llama_cpps_count_fits(
    database_url: str,
) -> None:
    """69 tokens left: the bound of a /v1 "hi" under the default system prompt (its bytes,
    86) was refused, where llama.cpp bills some thirty. Counted with the model's
    tokenizer it is served, the reservation holds llama.cpp's own count of the prompt,
    and the budget holds."""
    settings = make_settings(database_url, models={"local": LOCAL}, default_model="local")
    request = {"model": "local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await set_token_limit(client, "near", 69)
            answer = await client.post("/v1/chat/completions", json=request, headers=auth("near"))
            assert answer.status_code == 200, answer.text
            usage = answer.json()["usage"]
            provider = await server.services.providers.get("local")
            counts = await provider.count_tokens([settings.system_prompt_for("local"), "hi"])
            reserved_prompt = counted_prompt(sum(counts), 1)
            assert usage["prompt_tokens"] <= reserved_prompt, (usage, reserved_prompt)
            state = await books(server.engine, "near")
            assert state.total == state.ledger == usage["total_tokens"] <= 69
            assert state.reserved == 0


async def test_a_long_turn_whose_count_fits_the_context_is_sent_with_the_reservation_widened(
    database_url: str,
) -> None:
    """A 1,024-token context: a turn of some 240 tokens (1,105 bytes) was left out of the
    next prompt, with most of the context free, because the put-back history was held
    to the reservation the bound sized from what it kept. The reservation is widened for
    it; llama.cpp bills the prompt within the counted size the reservation holds, and
    the books balance."""
    small = LOCAL.model_copy(
        update={"context_window": 1024, "system_prompt": "Be brief.", "max_output_tokens": 16}
    )
    settings = make_settings(database_url, models={"local": small}, default_model="local")
    long_turn = "The quick brown fox jumps over the lazy dog near the river bank. " * 17
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            chat = await new_chat(client, "kai")
            first = await stream_message(client, chat, long_turn, token_for("kai"))
            assert first.last["done"] is True, first.last
            last = await stream_message(client, chat, "And?", token_for("kai"))
            assert last.last["done"] is True, last.last
            said = [row.content for row in await chat_rows(server.engine, chat)][:2]
            provider = await server.services.providers.get("local")
            counts = await provider.count_tokens(["Be brief.", *said, "And?"])
            assert len(long_turn.encode()) > 1024 > 2 * sum(counts)
            prompt = last.last["usage"]["prompt_tokens"]
            assert prompt > counts[1], "the long turn was sent"
            assert prompt <= counted_prompt(sum(counts), 3), "within what was reserved"
            state = await books(server.engine, "kai")
            assert state.total == state.ledger and state.reserved == 0
