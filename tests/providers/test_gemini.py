"""The Gemini adapter end to end: the real google-genai SDK against a loopback server that
speaks Gemini's wire protocol (no mocking of the SDK)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest
from google import genai
from google.genai import types

from chatmeter.config import ConfigError, ModelConfig, Settings
from chatmeter.providers.base import (
    ChatTurn,
    GenerationRequest,
    ProviderError,
    StreamOutcome,
    Usage,
)
from chatmeter.providers.gemini import GeminiProvider, create_gemini_provider
from tests.fakes.gemini_server import GeminiScript, GeminiServer

KEY = "gemini-test-key-0123456789"
MODEL = "gemini-2.5-flash"
REQUEST = GenerationRequest(
    system_prompt="You are terse.",
    history=(ChatTurn("user", "Hi there"), ChatTurn("assistant", "Hello!")),
    message="What is two plus two?",
    max_output_tokens=77,
)

MakeProvider = Callable[..., Awaitable[GeminiProvider]]


@dataclass
class Run:
    pieces: list[str] = field(default_factory=list)
    outcome: StreamOutcome = field(default_factory=StreamOutcome)
    error: ProviderError | None = None


async def run(provider: GeminiProvider, request: GenerationRequest = REQUEST) -> Run:
    result = Run()
    try:
        async with asyncio.timeout(10):
            async for piece in provider.stream(request, result.outcome):
                result.pieces.append(piece)
    except ProviderError as exc:
        result.error = exc
    return result


@pytest.fixture
async def make_provider(
    gemini_server: GeminiServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeProvider]:
    monkeypatch.setenv("GEMINI_TEST_KEY", KEY)
    made: list[GeminiProvider] = []

    async def make(timeout_seconds: float = 5.0) -> GeminiProvider:
        config = ModelConfig(
            provider="gemini",
            model=MODEL,
            api_key_env="GEMINI_TEST_KEY",
            base_url=gemini_server.url,
            timeout_seconds=timeout_seconds,
        )
        provider = await create_gemini_provider("gemini", config, Settings())
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


@pytest.fixture
async def provider(make_provider: MakeProvider) -> GeminiProvider:
    return await make_provider()


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Prove the upstream is closed by the adapter, not by garbage collection."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- streaming --------------------------------------------------------------------------


async def test_streams_pieces_in_order_with_usage(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(pieces=["Two", " plus two", " is", " four."])
    result = await run(provider)
    assert result.error is None
    assert result.pieces == ["Two", " plus two", " is", " four."]
    assert result.outcome.usage == Usage(prompt_tokens=11, completion_tokens=4)
    assert result.outcome.finish_reason == "stop"
    assert gemini_server.streams[-1].completed


async def test_pieces_arrive_as_they_are_sent(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    # the server sends each piece after the first only when released: a buffering
    # adapter would never hand out the first one
    gemini_server.script = GeminiScript(pieces=["a", "b", "c"], gated=True)
    stream = provider.stream(REQUEST, StreamOutcome())
    async with asyncio.timeout(5):
        assert await anext(stream) == "a"
        assert gemini_server.streams[-1].sent == 1
        gemini_server.release()
        assert await anext(stream) == "b"
        gemini_server.release()
        assert await anext(stream) == "c"
        with pytest.raises(StopAsyncIteration):
            await anext(stream)


async def test_cumulative_usage_on_every_chunk_is_not_summed(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(
        pieces=["a", "b", "c", "d", "e"],
        usage="every",
        prompt_tokens=20,
        cached_tokens=8,
        thinking_tokens=6,
    )
    result = await run(provider)
    assert result.outcome.usage == Usage(
        prompt_tokens=20, completion_tokens=5, thinking_tokens=6, cached_tokens=8
    )
    assert result.outcome.usage.total_tokens == 31


async def test_thought_parts_are_not_reply_text(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(
        pieces=["Four."], thoughts=["Let me add.", "2+2=4"], thinking_tokens=9
    )
    result = await run(provider)
    assert result.pieces == ["Four."]
    assert result.outcome.usage == Usage(11, 1, thinking_tokens=9)


async def test_no_usage_reported_leaves_usage_unset(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(usage="none")
    result = await run(provider)
    assert result.pieces == ["Hello", ", ", "world", "!"]
    assert result.outcome.usage is None
    assert result.outcome.finish_reason == "stop"


@pytest.mark.parametrize(
    ("gemini_reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("OTHER", "other"),
    ],
)
async def test_finish_reasons(
    provider: GeminiProvider, gemini_server: GeminiServer, gemini_reason: str, expected: str
) -> None:
    gemini_server.script = GeminiScript(pieces=["partial"], finish_reason=gemini_reason)
    result = await run(provider)
    assert result.error is None  # text already flowed: a late block ends the reply normally
    assert result.pieces == ["partial"]
    assert result.outcome.finish_reason == expected


@pytest.mark.parametrize(("usage", "before_output"), [("last", False), ("none", True)])
async def test_reply_blocked_before_any_text(
    provider: GeminiProvider,
    gemini_server: GeminiServer,
    usage: Literal["last", "none"],
    before_output: bool,
) -> None:
    gemini_server.script = GeminiScript(pieces=[], finish_reason="SAFETY", usage=usage)
    result = await run(provider)
    assert result.pieces == []
    assert result.error is not None
    assert result.error.code == "CONTENT_BLOCKED"
    # the model read the prompt and said so in usage: that is billed (SPEC section 5)
    assert result.error.before_output is before_output
    assert result.outcome.finish_reason == "content_filter"


async def test_prompt_blocked(provider: GeminiProvider, gemini_server: GeminiServer) -> None:
    gemini_server.script = GeminiScript(block_prompt="SAFETY")
    result = await run(provider)
    assert result.pieces == []
    assert result.error is not None
    assert result.error.code == "CONTENT_BLOCKED"
    assert result.error.before_output is True


# -- failures ---------------------------------------------------------------------------


async def test_rate_limited(provider: GeminiProvider, gemini_server: GeminiServer) -> None:
    gemini_server.script = GeminiScript(error_status=429)
    result = await run(provider)
    assert result.pieces == []
    assert result.error is not None
    assert result.error.code == "PROVIDER_RATE_LIMITED"
    assert result.error.before_output is True
    assert result.outcome.usage is None
    assert KEY not in result.error.message
    assert len(gemini_server.streams) == 1  # the SDK did not retry behind our back


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_http_errors(
    provider: GeminiProvider, gemini_server: GeminiServer, status: int
) -> None:
    gemini_server.script = GeminiScript(error_status=status)
    result = await run(provider)
    assert result.error is not None
    assert result.error.code == "PROVIDER_ERROR"
    assert result.error.before_output is True
    assert str(status) in result.error.message


async def test_drop_mid_stream(provider: GeminiProvider, gemini_server: GeminiServer) -> None:
    gemini_server.script = GeminiScript(pieces=["a", "b", "c", "d"], usage="every", drop_after=2)
    result = await run(provider)
    assert result.pieces == ["a", "b"]
    assert result.error is not None
    assert result.error.code == "PROVIDER_ERROR"
    assert result.error.before_output is False
    # the usage seen before the drop is kept for metering the partial reply
    assert result.outcome.usage == Usage(prompt_tokens=11, completion_tokens=2)
    assert result.outcome.finish_reason is None


async def test_stream_ending_without_finish_reason(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(pieces=["a", "b"], finish_reason=None)
    result = await run(provider)
    assert result.pieces == ["a", "b"]
    assert result.error is not None
    assert result.error.code == "PROVIDER_ERROR"
    assert result.error.before_output is False


async def test_hang_before_any_byte_times_out(
    make_provider: MakeProvider, gemini_server: GeminiServer
) -> None:
    provider = await make_provider(timeout_seconds=0.3)
    gemini_server.script = GeminiScript(hang_after=0)
    result = await run(provider)
    assert result.error is not None
    assert result.error.code == "PROVIDER_TIMEOUT"
    assert result.error.before_output is True
    assert await gemini_server.wait_disconnected()


async def test_stall_mid_stream_times_out(
    make_provider: MakeProvider, gemini_server: GeminiServer
) -> None:
    provider = await make_provider(timeout_seconds=0.3)
    gemini_server.script = GeminiScript(pieces=["a", "b", "c"], hang_after=1)
    result = await run(provider)
    assert result.pieces == ["a"]
    assert result.error is not None
    assert result.error.code == "PROVIDER_TIMEOUT"
    assert result.error.before_output is False


# -- cancellation -----------------------------------------------------------------------


@pytest.mark.usefixtures("no_gc")
async def test_aclose_mid_stream_closes_the_upstream_connection(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(pieces=["a", "b", "c"], gated=True)
    stream = provider.stream(REQUEST, StreamOutcome())
    async with asyncio.timeout(5):
        assert await anext(stream) == "a"
    await stream.aclose()
    assert await gemini_server.wait_disconnected()
    assert not gemini_server.streams[-1].completed
    assert gemini_server.streams[-1].sent == 1


@pytest.mark.usefixtures("no_gc")
async def test_cancelling_the_consumer_closes_the_upstream_connection(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    gemini_server.script = GeminiScript(pieces=["a", "b", "c"], gated=True)
    received: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for piece in provider.stream(REQUEST, StreamOutcome()):
            received.append(piece)
            first.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received == ["a"]
    assert await gemini_server.wait_disconnected()
    assert not gemini_server.streams[-1].completed


# -- what is sent -----------------------------------------------------------------------


async def test_request_body(provider: GeminiProvider, gemini_server: GeminiServer) -> None:
    await run(provider)
    sent = gemini_server.streams[-1].request
    assert sent.action == "streamGenerateContent"
    assert sent.query == "alt=sse"
    assert sent.model == MODEL
    assert sent.version == "v1"  # this SDK's default for the Gemini API
    assert sent.headers["x-goog-api-key"] == KEY
    # the SDK also turns its timeout into a server-side deadline for the whole call
    assert sent.headers["x-server-timeout"] == "5"
    body = sent.body
    assert body["systemInstruction"]["parts"] == [{"text": "You are terse."}]
    assert [(c["role"], c["parts"][0]["text"]) for c in body["contents"]] == [
        ("user", "Hi there"),
        ("model", "Hello!"),
        ("user", "What is two plus two?"),
    ]
    assert body["generationConfig"]["maxOutputTokens"] == 77


async def test_empty_system_prompt_is_not_sent(
    provider: GeminiProvider, gemini_server: GeminiServer
) -> None:
    await run(provider, GenerationRequest("", (), "Hi", max_output_tokens=5))
    assert "systemInstruction" not in gemini_server.last_body


# -- counting ---------------------------------------------------------------------------


async def test_count_tokens(provider: GeminiProvider, gemini_server: GeminiServer) -> None:
    counts = await provider.count_tokens(["You are terse.", "hello world", "", "one"])
    assert counts == [4, 3, 0, 2]  # the fake's rule: words + 1; empty text costs no call
    assert gemini_server.count_calls == 3
    bodies = [r.body for r in gemini_server.requests if r.action == "countTokens"]
    assert all(set(body) == {"contents"} for body in bodies)


async def test_count_tokens_failure(provider: GeminiProvider, gemini_server: GeminiServer) -> None:
    gemini_server.count_error_status = 500
    with pytest.raises(ProviderError) as caught:
        await provider.count_tokens(["hello"])
    assert caught.value.code == "PROVIDER_ERROR"


# -- set-up -----------------------------------------------------------------------------


async def test_factory_needs_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_TEST_KEY", raising=False)
    config = ModelConfig(provider="gemini", model=MODEL, api_key_env="GEMINI_TEST_KEY")
    with pytest.raises(ConfigError, match="GEMINI_TEST_KEY"):
        await create_gemini_provider("gemini", config, Settings())


async def test_fake_server_also_answers_v1beta(gemini_server: GeminiServer) -> None:
    # older SDKs default to v1beta: the fake answers both, here through generateContent
    client = genai.Client(
        vertexai=False,
        api_key=KEY,
        http_options=types.HttpOptions(base_url=gemini_server.url, api_version="v1beta"),
    )
    try:
        response = await client.aio.models.generate_content(model=MODEL, contents="Hi")
    finally:
        await client.aio.aclose()
        client.close()
    assert response.text == "Hello, world!"
    assert gemini_server.requests[-1].version == "v1beta"
    assert gemini_server.requests[-1].action == "generateContent"
