"""The exchange against an OpenAI-compatible server through the real `openai` SDK: the
request checked field by field, exact usage, counting with /tokenize when a server sends
no usage, the failure paths and the budget, each checked in the database afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from chatmeter.config import ModelConfig
from chatmeter.metering.counting import PER_MESSAGE_OVERHEAD
from tests.conftest import auth, make_settings, token_for
from tests.fakes.openai_server import OpenAIScript, OpenAIServer, fake_token_count
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows, ledger_row
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message
from tests.support.waiting import eventually


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIServer]:
    monkeypatch.setenv("OPENAI_TEST_KEY", "sk-test")
    fake = OpenAIServer().start()
    yield fake
    fake.stop()


@dataclass
class Stack:
    server: RunningServer
    client: httpx.AsyncClient
    upstream: OpenAIServer


@pytest.fixture
async def stack(database_url: str, upstream: OpenAIServer) -> AsyncIterator[Stack]:
    model = ModelConfig(
        provider="openai",
        model="llama-3.1-8b",
        api_key_env="OPENAI_TEST_KEY",
        base_url=upstream.base_url,
        timeout_seconds=5,
        max_output_tokens=300,
        system_prompt="You are terse.",
    )
    settings = make_settings(
        database_url,
        models={"vllm": model},
        default_model="vllm",
        provider_idle_timeout_seconds=1.0,
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            yield Stack(server, client, upstream)


async def test_request_fields_and_exact_usage(stack: Stack) -> None:
    stack.upstream.script = OpenAIScript(
        pieces=["Sure", ", ", "here."],
        prompt_tokens=41,
        completion_tokens=9,
        reasoning_tokens=4,
        cached_tokens=8,
    )
    chat = await new_chat(stack.client, "ada")
    stack.upstream.script = OpenAIScript(pieces=["first answer"], prompt_tokens=20)
    await stream_message(stack.client, chat, "first", token_for("ada"))
    stack.upstream.script = OpenAIScript(
        pieces=["Sure", ", ", "here."],
        prompt_tokens=41,
        completion_tokens=9,
        reasoning_tokens=4,
        cached_tokens=8,
    )
    result = await stream_message(stack.client, chat, "second", token_for("ada"))
    body = stack.upstream.last_body
    assert body["model"] == "llama-3.1-8b"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]
    assert body["max_tokens"] == 300
    assert stack.upstream.requests[-1].headers["authorization"] == "Bearer sk-test"
    assert result.text == "Sure, here."
    # reasoning tokens are inside completion_tokens in OpenAI's usage: billed once
    assert result.last["usage"] == {
        "prompt_tokens": 41,
        "completion_tokens": 5,
        "thinking_tokens": 4,
        "cached_tokens": 8,
        "total_tokens": 50,
        "source": "provider",
        "cost_micros": 0,  # no prices configured
    }
    row = await ledger_row(stack.server.engine, result.last["message_id"])
    assert row.total_tokens == 50 and row.source == "provider"
    assert not stack.upstream.tokenized  # usage came: no /tokenize call


async def test_no_usage_is_counted_with_tokenize(stack: Stack) -> None:
    stack.upstream.script = OpenAIScript(pieces=["four words right here"], usage=False)
    chat = await new_chat(stack.client, "bo")
    result = await stream_message(stack.client, chat, "count these three", token_for("bo"))
    usage = result.last["usage"]
    assert usage["source"] == "counted"
    expected = fake_token_count("You are terse.") + fake_token_count("count these three") + 10
    assert usage["prompt_tokens"] == expected
    assert usage["completion_tokens"] == fake_token_count("four words right here")
    state = await books(stack.server.engine, "bo")
    assert state.total == state.ledger == usage["total_tokens"] and state.reserved == 0


@pytest.mark.parametrize(
    "script",
    [
        OpenAIScript(pieces=["a reply"], prompt_tokens=-5000),  # would credit the user
        OpenAIScript(pieces=["a reply"], completion_tokens=2**63),  # past every column
        OpenAIScript(pieces=["a reply"], prompt_tokens=10, cached_tokens=-3),
        OpenAIScript(pieces=["a reply"], prompt_tokens=10, cached_tokens=11),
        # the SDK passes a stream's usage on unchecked: a fraction of a token was billed
        # as it came, a REAL in SQLite's ledger and message, cut off in the total
        OpenAIScript(pieces=["a reply"], prompt_tokens=10.5),
    ],
    ids=["negative", "past-bigint", "negative-cached", "more-cached-than-prompt", "fraction"],
)
async def test_usage_no_exchange_can_have_is_counted_instead(
    stack: Stack, script: OpenAIScript
) -> None:
    stack.upstream.script = script
    chat = await new_chat(stack.client, "di")
    result = await stream_message(stack.client, chat, "count these three", token_for("di"))
    usage = result.last["usage"]
    assert usage["source"] == "counted"
    expected = fake_token_count("You are terse.") + fake_token_count("count these three") + 10
    assert usage["prompt_tokens"] == expected and usage["cached_tokens"] == 0
    assert usage["completion_tokens"] == fake_token_count("a reply")
    row = await ledger_row(stack.server.engine, result.last["message_id"])
    assert row.total_tokens == usage["total_tokens"] and row.source == "counted"
    state = await books(stack.server.engine, "di")
    assert state.total == state.ledger == usage["total_tokens"] and state.reserved == 0
    answer = await stack.client.get("/api/usage", headers=auth("di"))
    assert answer.status_code == 200
    assert answer.json()["total_tokens_used"] == usage["total_tokens"]


async def test_no_usage_and_no_tokenize_is_estimated(stack: Stack) -> None:
    stack.upstream.script = OpenAIScript(pieces=["some reply"], usage=False, tokenize=False)
    chat = await new_chat(stack.client, "cy")
    result = await stream_message(stack.client, chat, "hello", token_for("cy"))
    usage = result.last["usage"]
    assert usage["source"] == "estimated"
    # the seed's estimate, ceil(chars / 4 x 1.05) per text, plus the overhead
    assert usage["completion_tokens"] == -(-len("some reply") * 105 // 400)


@pytest.mark.parametrize(
    ("script", "code", "billed"),
    [
        (OpenAIScript(error_status=429), "PROVIDER_RATE_LIMITED", False),
        (OpenAIScript(error_status=500), "PROVIDER_ERROR", False),
        (OpenAIScript(pieces=["a ", "b ", "c"], drop_after=2, usage=False), "PROVIDER_ERROR", True),
        (OpenAIScript(pieces=["a ", "b"], hang_after=1, usage=False), "PROVIDER_TIMEOUT", True),
    ],
    ids=["429", "500", "drop", "hang"],
)
async def test_failures(stack: Stack, script: OpenAIScript, code: str, billed: bool) -> None:
    stack.upstream.script = script
    chat = await new_chat(stack.client, "dee")
    result = await stream_message(stack.client, chat, "hello", token_for("dee"))
    error = result.last
    assert error["error"] is True and error["code"] == code
    engine = stack.server.engine
    rows = await chat_rows(engine, chat)
    assert rows[1].status == "failed" and rows[1].content == result.text
    assert (error["tokens_used"] > 0) is billed
    state = await books(engine, "dee")
    assert state.total == state.ledger == error["tokens_used"]
    assert state.reserved == 0 and state.open_reservations == 0


async def test_a_client_that_leaves_does_not_cancel_the_upstream_call(stack: Stack) -> None:
    """CHATMETER_ON_DISCONNECT=continue (the default): the reply goes on to its end, is
    saved complete and billed once, with the provider's own usage."""
    pieces = [f"w{i} " for i in range(30)]
    stack.upstream.script = OpenAIScript(pieces=pieces, delay=0.02)
    chat = await new_chat(stack.client, "eve")
    seen = await stream_message(stack.client, chat, "go", token_for("eve"), stop_after=2)
    assert len(seen.chunks) == 2
    engine = stack.server.engine

    async def saved() -> bool:
        return len(await chat_rows(engine, chat)) == 2

    await eventually(saved, within=30)
    rows = await chat_rows(engine, chat)
    assert rows[1].status == "complete" and rows[1].content == "".join(pieces)
    assert rows[1].metering_source == "provider"
    assert stack.upstream.streams[-1].completed
    assert not stack.upstream.streams[-1].disconnected.is_set()
    state = await books(engine, "eve")
    assert state.total == state.ledger == rows[1].tokens_consumed > 0 and state.reserved == 0


async def test_disconnect_with_on_disconnect_stop_closes_the_upstream_stream(
    database_url: str, upstream: OpenAIServer
) -> None:
    upstream.script = OpenAIScript(pieces=[f"w{i} " for i in range(50)], delay=0.05)
    model = ModelConfig(
        provider="openai", model="m", api_key_env="OPENAI_TEST_KEY", base_url=upstream.base_url
    )
    settings = make_settings(
        database_url, models={"vllm": model}, default_model="vllm", on_disconnect="stop"
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat = await new_chat(client, "eve")
            seen = await stream_message(client, chat, "go", token_for("eve"), stop_after=2)
            assert len(seen.chunks) == 2
            assert await upstream.wait_disconnected(within=30)
            engine = server.engine

            async def saved() -> bool:
                return len(await chat_rows(engine, chat)) == 2

            await eventually(saved, within=30)
            rows = await chat_rows(engine, chat)
            assert rows[1].status == "interrupted"
            state = await books(engine, "eve")
            assert state.total == state.ledger == rows[1].tokens_consumed > 0
            assert state.reserved == 0


async def test_budget_caps_the_requested_tokens(stack: Stack) -> None:
    admin = auth("root", admin=True)
    chat = await new_chat(stack.client, "fay")
    system = "You are terse."
    bound = len(system.encode()) + len(b"hi") + 2 * PER_MESSAGE_OVERHEAD + 10
    await stack.client.put(
        "/api/admin/users/fay/limit", json={"token_limit": bound + 25}, headers=admin
    )
    stack.upstream.script = OpenAIScript(pieces=["ok"], prompt_tokens=5, completion_tokens=1)
    result = await stream_message(stack.client, chat, "hi", token_for("fay"))
    assert result.last["done"] is True
    assert stack.upstream.last_body["max_tokens"] == 25  # lowered from 300 to what is left


async def test_an_estimated_reply_is_never_billed_past_the_limit(stack: Stack) -> None:
    """A server that reports no usage and has no /tokenize is estimated, at
    ceil(chars / 4 x 1.05): a reply of long words (one token each, 9 characters with its
    space) ran 2.4x the tokens the server could generate under max_tokens, billed past
    the reservation and the user's limit. Billed completion stays within the cap sent."""
    admin = auth("root", admin=True)
    chat = await new_chat(stack.client, "gus")
    system = "You are terse."
    bound = len(system.encode()) + len(b"hi") + 2 * PER_MESSAGE_OVERHEAD + 10
    limit = bound + 25
    await stack.client.put("/api/admin/users/gus/limit", json={"token_limit": limit}, headers=admin)
    stack.upstream.script = OpenAIScript(pieces=[" whatever"] * 25, usage=False, tokenize=False)
    result = await stream_message(stack.client, chat, "hi", token_for("gus"))
    assert stack.upstream.streams[-1].request.body["max_tokens"] == 25
    usage = result.last["usage"]
    assert usage["source"] == "estimated"
    assert usage["completion_tokens"] <= 25  # was 60
    state = await books(stack.server.engine, "gus")
    assert state.total == state.ledger == usage["total_tokens"] <= limit
    assert state.reserved == 0


@pytest.mark.parametrize(
    ("reason", "saved"),
    [
        ("end_turn_because_the_model_chose_to_stop_here", "end_turn_because_the_model_chose"),
        ("stop\x00", "stop\ufffd"),
        ("stop\ud800", "stop\ufffd"),
    ],
    ids=["long", "nul", "lone-surrogate"],
)
async def test_a_finish_reason_no_column_takes_is_saved_and_billed(
    stack: Stack, reason: str, saved: str
) -> None:
    """The server names the finish reason, and messages.finish_reason holds 32
    characters of text: on PostgreSQL a longer one, or one with a NUL, failed the
    settlement's transaction every time it was tried (a lone surrogate failed it on
    SQLite too), so the reply was never saved and its usage never billed."""
    stack.upstream.script = OpenAIScript(pieces=["a reply"], finish_reason=reason)
    chat = await new_chat(stack.client, "fin")
    result = await stream_message(stack.client, chat, "hello", token_for("fin"))
    assert result.last["done"] is True, result.last
    assert result.last["finish_reason"] == saved
    rows = await chat_rows(stack.server.engine, chat)
    assert [(row.role, row.finish_reason) for row in rows] == [
        ("user", None),
        ("assistant", saved),
    ]
    row = await ledger_row(stack.server.engine, result.last["message_id"])
    assert row is not None and row.total_tokens == result.last["tokens_used"]
    state = await books(stack.server.engine, "fin")
    assert state.total == state.ledger == row.total_tokens and state.reserved == 0
