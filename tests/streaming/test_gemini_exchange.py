"""The exchange against Gemini's wire protocol through the real SDK: exact provider usage
(thinking tokens billed, the last usage kept), counting when no usage came, and the
failure paths, each checked in the database afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal

import httpx
import pytest

from chatmeter.config import ModelConfig
from chatmeter.db.engine import make_engine
from tests.conftest import auth, make_settings, token_for
from tests.fakes.gemini_server import GeminiScript, GeminiServer, count_rule, running_gemini_server
from tests.streaming.test_exchange import new_chat
from tests.support.db import books, chat_rows, ledger_row
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message


@pytest.fixture
def gemini(monkeypatch: pytest.MonkeyPatch) -> Iterator[GeminiServer]:
    monkeypatch.setenv("GEMINI_TEST_KEY", "test-key")
    with running_gemini_server() as server:
        yield server


@dataclass
class Stack:
    server: RunningServer
    client: httpx.AsyncClient
    gemini: GeminiServer


@pytest.fixture
async def stack(database_url: str, gemini: GeminiServer) -> AsyncIterator[Stack]:
    model = ModelConfig(
        provider="gemini",
        model="gemini-2.5-flash",
        api_key_env="GEMINI_TEST_KEY",
        base_url=gemini.url,
        timeout_seconds=5,
        max_output_tokens=256,
        # SPEC section 10: what the exchanges below cost, exactly
        price_input=Decimal("0.30"),
        price_cached_input=Decimal("0.075"),
        price_output=Decimal("2.50"),
        price_thinking=Decimal("3.50"),
    )
    settings = make_settings(
        database_url,
        models={"gemini": model},
        default_model="gemini",
        provider_idle_timeout_seconds=1.0,
    )
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            yield Stack(server, client, gemini)


async def test_provider_usage_is_billed_exactly_with_thinking(stack: Stack) -> None:
    stack.gemini.script = GeminiScript(
        pieces=["The ", "answer ", "is 42."],
        usage="every",
        prompt_tokens=37,
        cached_tokens=5,
        thinking_tokens=120,
        thoughts=["let me think"],
    )
    chat = await new_chat(stack.client, "uma")
    result = await stream_message(stack.client, chat, "What is it?", token_for("uma"))
    assert result.text == "The answer is 42."
    usage = result.last["usage"]
    # the last cumulative usage, never the sum of every chunk's
    assert usage == {
        "prompt_tokens": 37,
        "completion_tokens": 3,
        "thinking_tokens": 120,
        "cached_tokens": 5,
        "total_tokens": 160,
        "source": "provider",
        # (37 - 5) x 0.30 + 5 x 0.075 + 3 x 2.50 + 120 x 3.50 = 437.475 -> 437
        "cost_micros": 437,
    }
    assert result.last["tokens_used"] == 160
    assert stack.gemini.count_calls == 0  # usage came: no count-tokens call at all
    body = stack.gemini.last_body
    assert body["generationConfig"]["maxOutputTokens"] == 256
    assert body["contents"][-1] == {"role": "user", "parts": [{"text": "What is it?"}]}
    row = await ledger_row(stack.server.engine, result.last["message_id"])
    assert (row.prompt_tokens, row.completion_tokens, row.thinking_tokens) == (37, 3, 120)
    assert (row.cached_tokens, row.total_tokens, row.source) == (5, 160, "provider")
    state = await books(stack.server.engine, "uma")
    assert state.total == state.ledger == 160 and state.reserved == 0


async def test_history_goes_to_the_provider_in_order(stack: Stack) -> None:
    chat = await new_chat(stack.client, "vera")
    stack.gemini.script = GeminiScript(pieces=["first reply"])
    await stream_message(stack.client, chat, "first question", token_for("vera"))
    stack.gemini.script = GeminiScript(pieces=["second reply"])
    await stream_message(stack.client, chat, "second question", token_for("vera"))
    contents = stack.gemini.last_body["contents"]
    assert [(c["role"], c["parts"][0]["text"]) for c in contents] == [
        ("user", "first question"),
        ("model", "first reply"),
        ("user", "second question"),
    ]


async def test_no_usage_is_counted_with_count_tokens(stack: Stack) -> None:
    stack.gemini.script = GeminiScript(pieces=["three word reply"], usage="none")
    chat = await new_chat(stack.client, "wade")
    result = await stream_message(stack.client, chat, "count me please", token_for("wade"))
    usage = result.last["usage"]
    assert usage["source"] == "counted"
    system = stack.server.services.settings.system_prompt_for("gemini")
    # the fake counts words + 1 per text; the seed adds 10 per exchange
    assert usage["prompt_tokens"] == count_rule([system]) + count_rule(["count me please"]) + 10
    assert usage["completion_tokens"] == count_rule(["three word reply"])
    calls = stack.gemini.count_calls
    assert calls == 3  # system prompt, message, reply
    # the system prompt's count is cached for the process, other texts in the LRU: the
    # same exchange again (now with itself as history) needs no count call
    again = await stream_message(stack.client, chat, "count me please", token_for("wade"))
    assert stack.gemini.count_calls == calls
    history = count_rule(["count me please"]) + count_rule(["three word reply"])
    assert again.last["usage"]["prompt_tokens"] == usage["prompt_tokens"] + history
    # a new message costs one call: only its own text is new
    await stream_message(stack.client, chat, "something new", token_for("wade"))
    assert stack.gemini.count_calls == calls + 1


@pytest.mark.parametrize("answer", [-1000, 2**31 - 1], ids=["negative", "past-the-bytes"])
async def test_a_count_no_text_can_have_is_estimated_instead(stack: Stack, answer: int) -> None:
    """countTokens of a broken proxy answering a negative figure (billed as it came, the
    reply credited the user), or more tokens than the text has bytes (billions for a few
    words): it is not believed, as a report of usage is not."""
    stack.gemini.script = GeminiScript(pieces=["three word reply"], usage="none")
    stack.gemini.count_answer = answer
    chat = await new_chat(stack.client, "wynn")
    result = await stream_message(stack.client, chat, "count me please", token_for("wynn"))
    usage = result.last["usage"]
    assert usage["source"] == "estimated" and usage["total_tokens"] > 0
    state = await books(stack.server.engine, "wynn")
    assert state.total == state.ledger == usage["total_tokens"] and state.reserved == 0


async def test_an_exact_count_no_text_can_have_reserves_nothing(stack: Stack) -> None:
    """A message whose byte bound passes the context is counted exactly and reserved for
    at that count: a negative one reserved less than nothing, and the user's reserved
    tokens went below 0 while it streamed, room for other replies past the limit."""
    stack.gemini.count_answer = -1_000_000
    chat = await new_chat(stack.client, "wolf")
    result = await stream_message(stack.client, chat, "é" * 5000, token_for("wolf"))
    assert result.status == 400 and result.body["code"] == "INVALID_MESSAGE"
    usage = await stack.client.get("/api/usage", headers=auth("wolf"))
    assert usage.json()["reserved_tokens"] == usage.json()["total_tokens_used"] == 0


async def test_rate_limited_up_front_bills_nothing(stack: Stack) -> None:
    stack.gemini.script = GeminiScript(error_status=429)
    chat = await new_chat(stack.client, "xena")
    result = await stream_message(stack.client, chat, "hello", token_for("xena"))
    assert result.status == 200
    error = result.last
    assert error["error"] is True and error["code"] == "PROVIDER_RATE_LIMITED"
    assert error["tokens_used"] == 0
    engine = stack.server.engine
    rows = await chat_rows(engine, chat)
    assert [(r.role, r.status, r.tokens_consumed) for r in rows] == [
        ("user", "complete", 0),
        ("assistant", "failed", 0),
    ]
    assert str(rows[1].message_id) == error["message_id"]
    state = await books(engine, "xena")
    assert state.total == state.ledger == 0 and state.ledger_rows == 0
    assert state.reserved == 0 and state.open_reservations == 0


async def test_drop_mid_stream_saves_failed_partial_and_bills_it(stack: Stack) -> None:
    stack.gemini.script = GeminiScript(
        pieces=["one ", "two ", "three ", "four"], drop_after=2, usage="none"
    )
    chat = await new_chat(stack.client, "yuri")
    result = await stream_message(stack.client, chat, "hello", token_for("yuri"))
    assert result.text == "one two "
    error = result.last
    assert error["error"] is True and error["code"] == "PROVIDER_ERROR"
    engine = stack.server.engine
    rows = await chat_rows(engine, chat)
    assert rows[1].status == "failed" and rows[1].content == "one two "
    assert rows[1].tokens_consumed == error["tokens_used"] > 0
    assert rows[1].metering_source == "counted"
    state = await books(engine, "yuri")
    assert state.total == state.ledger == error["tokens_used"]
    assert state.reserved == 0 and state.open_reservations == 0


async def test_hanging_provider_times_out_and_keeps_partial(stack: Stack) -> None:
    stack.gemini.script = GeminiScript(pieces=["partial ", "never"], hang_after=1, usage="none")
    chat = await new_chat(stack.client, "zoe")
    result = await stream_message(stack.client, chat, "hello", token_for("zoe"))
    assert result.text == "partial "
    assert result.last["code"] == "PROVIDER_TIMEOUT"
    rows = await chat_rows(stack.server.engine, chat)
    assert rows[1].status == "failed" and rows[1].content == "partial "
    state = await books(stack.server.engine, "zoe")
    assert state.total == state.ledger == result.last["tokens_used"] and state.reserved == 0


async def test_safety_block_is_content_blocked(stack: Stack) -> None:
    stack.gemini.script = GeminiScript(block_prompt="SAFETY")
    chat = await new_chat(stack.client, "abe")
    result = await stream_message(stack.client, chat, "something bad", token_for("abe"))
    assert result.last["code"] == "CONTENT_BLOCKED"
    state = await books(stack.server.engine, "abe")
    assert state.total == state.ledger and state.reserved == 0


async def test_provider_that_cannot_start_fails_cleanly(database_url: str) -> None:
    model = ModelConfig(
        provider="gemini", model="gemini-2.5-flash", api_key_env="CHATMETER_TEST_NO_SUCH_KEY"
    )
    settings = make_settings(database_url, models={"broken": model})
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            chat = await new_chat(client, "bea", model="broken")
            result = await stream_message(client, chat, "hello", token_for("bea"))
    assert result.status == 200
    assert result.last["error"] is True and result.last["code"] == "PROVIDER_ERROR"
    assert result.last["tokens_used"] == 0
    engine = make_engine(database_url)
    try:
        rows = await chat_rows(engine, chat)
        assert [(r.role, r.status) for r in rows] == [("user", "complete"), ("assistant", "failed")]
        state = await books(engine, "bea")
        assert state.total == state.ledger == 0
        assert state.reserved == 0 and state.open_reservations == 0
    finally:
        await engine.dispose()
