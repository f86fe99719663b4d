"""`/v1` in front of real provider protocols: the loopback OpenAI-compatible and Gemini
servers, each driven by its own official SDK inside chatmeter, while the official
`openai` SDK is chatmeter's client. What the model received is the client's
conversation; usage is exact, reasoning counted inside completion tokens, cached tokens
reported; a failure and a safety block are answered the OpenAI way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from chatmeter.config import ModelConfig
from tests.conftest import make_settings
from tests.fakes.gemini_server import GeminiScript, GeminiServer, running_gemini_server
from tests.fakes.openai_server import OpenAIScript, OpenAIServer
from tests.support.db import books, ledger_row
from tests.support.server import RunningServer, serve
from tests.v1.conftest import new_key, sdk_for
from tests.v1.test_completions import exchange_id

CONVERSATION: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be exact."},
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second"},
]


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIServer]:
    monkeypatch.setenv("OPENAI_TEST_KEY", "sk-test")
    fake = OpenAIServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def gemini(monkeypatch: pytest.MonkeyPatch) -> Iterator[GeminiServer]:
    monkeypatch.setenv("GEMINI_TEST_KEY", "test-key")
    with running_gemini_server() as server:
        yield server


@dataclass
class Stack:
    server: RunningServer
    sdk: AsyncOpenAI


@pytest.fixture
async def stack(
    database_url: str, upstream: OpenAIServer, gemini: GeminiServer
) -> AsyncIterator[Stack]:
    models = {
        "vllm": ModelConfig(
            provider="openai",
            model="llama-3.1-8b",
            api_key_env="OPENAI_TEST_KEY",
            base_url=upstream.base_url,
            timeout_seconds=5,
            max_output_tokens=300,
            system_prompt="The configured prompt, replaced by the request's.",
        ),
        "gemini": ModelConfig(
            provider="gemini",
            model="gemini-2.5-flash",
            api_key_env="GEMINI_TEST_KEY",
            base_url=gemini.url,
            timeout_seconds=5,
            max_output_tokens=256,
        ),
    }
    settings = make_settings(database_url, models=models, provider_idle_timeout_seconds=1.0)
    async with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            key = await new_key(http, "vic")
        async with sdk_for(server, key) as sdk:
            yield Stack(server, sdk)


async def assert_billed(stack: Stack, completion_id: str, total: int) -> None:
    engine = stack.server.engine
    row = await ledger_row(engine, exchange_id(completion_id))
    assert row is not None and row.chat_id is None and row.total_tokens == total
    assert row.source == "provider"
    state = await books(engine, "vic")
    assert state.total == state.ledger and state.reserved == 0


async def test_openai_compatible_upstream_exact_usage(stack: Stack, upstream: OpenAIServer) -> None:
    upstream.script = OpenAIScript(
        pieces=["Sure", ", ", "here."],
        prompt_tokens=41,
        completion_tokens=9,
        reasoning_tokens=4,
        cached_tokens=8,
    )
    completion = await stack.sdk.chat.completions.create(
        model="vllm",
        messages=CONVERSATION,
        max_tokens=50,
    )
    sent = upstream.last_body
    assert sent["model"] == "llama-3.1-8b"
    assert sent["messages"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]
    assert sent["max_tokens"] == 50
    # not asked for, not sent: the server's own defaults apply
    assert not {"temperature", "top_p", "stop"} & set(sent)
    assert completion.choices[0].message.content == "Sure, here."
    usage = completion.usage
    assert usage is not None
    # OpenAI's own convention: reasoning tokens inside completion tokens
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (41, 9, 50)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 8
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4
    await assert_billed(stack, completion.id, 50)


async def test_gemini_upstream_streamed_with_thinking_and_cache(
    stack: Stack, gemini: GeminiServer
) -> None:
    gemini.script = GeminiScript(
        pieces=["Gem", "ini ", "says hi"], prompt_tokens=30, cached_tokens=12, thinking_tokens=7
    )
    stream = await stack.sdk.chat.completions.create(
        model="gemini",
        messages=CONVERSATION,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Gemini says hi"
    body = gemini.last_body
    assert body["systemInstruction"]["parts"][0]["text"] == "Be exact."
    assert [(c["role"], c["parts"][0]["text"]) for c in body["contents"]] == [
        ("user", "first"),
        ("model", "first answer"),
        ("user", "second"),
    ]
    assert not {"temperature", "topP", "stopSequences"} & set(body["generationConfig"])
    usage = chunks[-1].usage
    assert usage is not None
    # three pieces, one token each, plus seven of thinking
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, 10, 40)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 12
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7
    await assert_billed(stack, chunks[-1].id, 40)


async def test_an_upstream_failure_is_a_server_error_and_bills_nothing(
    stack: Stack, upstream: OpenAIServer
) -> None:
    upstream.script = OpenAIScript(error_status=500)
    with pytest.raises(openai.InternalServerError) as caught:
        await stack.sdk.chat.completions.create(
            model="vllm",
            messages=[{"role": "user", "content": "Hi"}],
        )
    assert caught.value.status_code == 502
    assert caught.value.code == "provider_error"
    state = await books(stack.server.engine, "vic")
    assert (state.total, state.reserved, state.ledger_rows) == (0, 0, 0)


async def test_a_failure_mid_stream_is_an_error_event_and_bills_what_was_used(
    stack: Stack, upstream: OpenAIServer
) -> None:
    upstream.script = OpenAIScript(pieces=["a ", "b ", "c"], drop_after=2, usage=False)
    stream = await stack.sdk.chat.completions.create(
        model="vllm", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk)
    assert "model failed" in caught.value.message
    assert "".join(c.choices[0].delta.content or "" for c in seen if c.choices) == "a b "
    state = await books(stack.server.engine, "vic")
    assert state.total == state.ledger > 0 and state.reserved == 0


async def test_a_safety_block_is_finish_reason_content_filter(
    stack: Stack, gemini: GeminiServer
) -> None:
    gemini.script = GeminiScript(pieces=["Partial "], finish_reason="SAFETY")
    completion = await stack.sdk.chat.completions.create(
        model="gemini", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content == "Partial "
    gemini.script = GeminiScript(block_prompt="SAFETY")
    blocked = await stack.sdk.chat.completions.create(
        model="gemini", messages=[{"role": "user", "content": "Hi"}]
    )
    assert blocked.choices[0].finish_reason == "content_filter"
    assert blocked.choices[0].message.content == ""


async def test_sampling_reaches_an_openai_compatible_upstream_in_its_wire_names(
    stack: Stack, upstream: OpenAIServer
) -> None:
    await stack.sdk.chat.completions.create(
        model="vllm",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0.3,
        top_p=0.5,
        stop=["END", "\n\n"],
    )
    sent = upstream.streams[-1].request.body
    assert (sent["temperature"], sent["top_p"], sent["stop"]) == (0.3, 0.5, ["END", "\n\n"])
    # one string is one stop sequence; the bounds themselves are in range
    stream = await stack.sdk.chat.completions.create(
        model="vllm",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=2,
        top_p=0,
        stop="END",
        stream=True,
    )
    assert [chunk async for chunk in stream]
    sent = upstream.streams[-1].request.body
    assert (sent["temperature"], sent["top_p"], sent["stop"]) == (2, 0, ["END"])


async def test_sampling_reaches_gemini_as_its_generation_config(
    stack: Stack, gemini: GeminiServer
) -> None:
    await stack.sdk.chat.completions.create(
        model="gemini",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=1.25,
        top_p=0.95,
        stop=["END", "\n\n", "Q:"],
        max_tokens=40,
    )
    config = gemini.streams[-1].request.body["generationConfig"]
    assert config == {
        "temperature": 1.25,
        "topP": 0.95,
        "stopSequences": ["END", "\n\n", "Q:"],
        "maxOutputTokens": 40,
    }
