"""The `openai` provider end to end: the real `openai` SDK against a loopback server that
speaks the Chat Completions streaming protocol (tests/fakes/openai_server.py)."""

from __future__ import annotations

import asyncio
import gc
import socket
import types
from collections.abc import AsyncIterator, Iterator

import pytest

from chatmeter.config import ModelConfig, Settings
from chatmeter.providers.base import (
    ChatTurn,
    GenerationRequest,
    ProviderError,
    StreamOutcome,
    Usage,
)
from chatmeter.providers.openai_compat import (
    OpenAICompatibleProvider,
    caps_with_max_completion_tokens,
    create_openai_provider,
    server_root,
)
from tests.fakes.openai_server import OpenAIScript, OpenAIServer, fake_token_count
from tests.support.waiting import eventually

REQUEST = GenerationRequest(
    system_prompt="You are terse.",
    history=(ChatTurn("user", "Hi there"), ChatTurn("assistant", "Hello!")),
    message="What is two plus two?",
    max_output_tokens=77,
)


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIServer]:
    fake = OpenAIServer().start()
    yield fake
    fake.stop()


async def make_provider(
    openai_server: OpenAIServer, *, timeout_seconds: float = 5.0, api_key_env: str | None = None
) -> OpenAICompatibleProvider:
    config = ModelConfig(
        provider="openai",
        model="gpt-test",
        base_url=openai_server.base_url,
        api_key_env=api_key_env,
        timeout_seconds=timeout_seconds,
    )
    return await create_openai_provider("gpt", config, Settings())


@pytest.fixture
async def provider(openai_server: OpenAIServer) -> AsyncIterator[OpenAICompatibleProvider]:
    openai_server.reset()
    built = await make_provider(openai_server)
    yield built
    await built.aclose()


async def run(
    provider: OpenAICompatibleProvider, request: GenerationRequest = REQUEST
) -> tuple[list[str], StreamOutcome]:
    outcome = StreamOutcome()
    pieces = [piece async for piece in provider.stream(request, outcome)]
    return pieces, outcome


async def failure(provider: OpenAICompatibleProvider) -> tuple[ProviderError, list[str]]:
    pieces: list[str] = []
    with pytest.raises(ProviderError) as caught:
        async for piece in provider.stream(REQUEST, StreamOutcome()):
            pieces.append(piece)
    return caught.value, pieces


# -- the request -----------------------------------------------------------------------


async def test_request_is_a_streaming_chat_completion_with_usage(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    await run(provider)
    body = openai_server.last_body
    assert openai_server.requests[-1].path == "/v1/chat/completions"
    assert body["model"] == "gpt-test"
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is two plus two?"},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 77
    assert "max_completion_tokens" not in body
    assert openai_server.requests[-1].headers["authorization"] == "Bearer not-needed"


async def test_the_configured_key_is_sent_to_chat_and_tokenize(
    openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    openai_server.reset()
    monkeypatch.setenv("CHATMETER_TEST_OPENAI_KEY", "sk-test-123")
    provider = await make_provider(openai_server, api_key_env="CHATMETER_TEST_OPENAI_KEY")
    try:
        await run(provider)
        await provider.count_tokens(["one two"])
    finally:
        await provider.aclose()
    assert [r.headers["authorization"] for r in openai_server.requests] == [
        "Bearer sk-test-123"
    ] * 2


def test_openai_itself_gets_max_completion_tokens() -> None:
    # its reasoning models reject max_tokens; every other openai_server knows max_tokens
    assert caps_with_max_completion_tokens("https://api.openai.com/v1")
    assert not caps_with_max_completion_tokens("http://127.0.0.1:8080/v1")
    assert not caps_with_max_completion_tokens("http://localhost:11434/v1/")


def test_server_root_drops_the_api_version() -> None:
    assert server_root("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080"
    assert server_root("http://127.0.0.1:8080/v1/") == "http://127.0.0.1:8080"
    assert server_root("http://proxy/openai") == "http://proxy/openai"


# -- the reply ---------------------------------------------------------------------------


async def test_pieces_are_yielded_as_they_arrive(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(pieces=["a", "b", "c", "d"], delay=0.2)
    outcome = StreamOutcome()
    stream = provider.stream(REQUEST, outcome)
    first = await anext(stream)
    # the first piece is in our hands while the openai_server still has pieces to send
    assert first == "a"
    assert openai_server.streams[-1].sent < 4
    assert [piece async for piece in stream] == ["b", "c", "d"]
    assert outcome.finish_reason == "stop"


@pytest.mark.parametrize(
    "script",
    [
        # one choice is asked for (n = 1); another that came first in a chunk was joined
        # to the reply ("SECONDHello...") and saved as its text
        OpenAIScript(other_choice="SECOND", finish_reason="length"),
        # a server that leaves `index` out of its one choice (the SDK does not check it:
        # it reads None): its reply was dropped whole, an empty reply billed as complete
        OpenAIScript(choice_index=False, finish_reason="length"),
    ],
    ids=["another-choice-first", "no-index"],
)
async def test_the_reply_is_the_first_choice(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer, script: OpenAIScript
) -> None:
    openai_server.script = script
    pieces, outcome = await run(provider)
    assert "".join(pieces) == "Hello, world!"
    assert outcome.finish_reason == "length"


async def test_usage_is_the_servers_exactly(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(prompt_tokens=123, completion_tokens=45, cached_tokens=100)
    pieces, outcome = await run(provider)
    assert "".join(pieces) == "Hello, world!"
    assert outcome.usage == Usage(prompt_tokens=123, completion_tokens=45, cached_tokens=100)
    assert outcome.finish_reason == "stop"


async def test_reasoning_tokens_are_thinking_and_not_billed_twice(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    # OpenAI counts reasoning tokens inside completion_tokens
    openai_server.script = OpenAIScript(
        prompt_tokens=20, completion_tokens=300, reasoning_tokens=256
    )
    _, outcome = await run(provider)
    assert outcome.usage == Usage(prompt_tokens=20, completion_tokens=44, thinking_tokens=256)
    assert outcome.usage.total_tokens == 20 + 300


async def test_a_server_without_usage_leaves_it_unset(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(usage=False)
    pieces, outcome = await run(provider)
    assert pieces == ["Hello", ", ", "world", "!"]
    assert outcome.usage is None
    assert outcome.finish_reason == "stop"


async def test_finish_reason_is_passed_through(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(finish_reason="length")
    _, outcome = await run(provider)
    assert outcome.finish_reason == "length"


async def test_content_filter_after_text_is_a_finish_reason(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(finish_reason="content_filter")
    pieces, outcome = await run(provider)
    assert pieces
    assert outcome.finish_reason == "content_filter"


@pytest.mark.parametrize("usage", [True, False])
async def test_content_filter_before_any_text_is_content_blocked(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer, usage: bool
) -> None:
    openai_server.script = OpenAIScript(pieces=[], finish_reason="content_filter", usage=usage)
    outcome = StreamOutcome()
    with pytest.raises(ProviderError) as caught:
        async for _ in provider.stream(REQUEST, outcome):
            pass
    assert caught.value.code == "CONTENT_BLOCKED"
    # the prompt was billed when the openai_server says so; with no usage nothing is known
    assert caught.value.before_output is not usage
    assert (outcome.usage is not None) is usage


# -- failures ----------------------------------------------------------------------------


async def test_429_is_rate_limited_before_output_and_not_retried(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(error_status=429)
    error, pieces = await failure(provider)
    assert error.code == "PROVIDER_RATE_LIMITED"
    assert error.before_output is True
    assert error.message == "the model server answered HTTP 429"
    # OpenAI's own text (it names the organisation) stays on the cause, for the logs
    assert "Rate limit reached" in str(error.__cause__)
    assert pieces == []
    assert len(openai_server.requests) == 1


async def test_500_is_a_provider_error_before_output(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(error_status=500)
    error, _ = await failure(provider)
    assert error.code == "PROVIDER_ERROR"
    assert error.before_output is True
    assert len(openai_server.requests) == 1


async def test_a_dropped_stream_is_a_provider_error_after_output(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(drop_after=2)
    error, pieces = await failure(provider)
    assert pieces == ["Hello", ", "]
    assert error.code == "PROVIDER_ERROR"
    assert error.before_output is False


async def test_a_stream_dropped_before_any_text_is_before_output(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(drop_after=0)
    error, pieces = await failure(provider)
    assert (error.code, error.before_output, pieces) == ("PROVIDER_ERROR", True, [])


async def test_an_error_event_mid_stream_is_a_provider_error(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    # llama.cpp reports a failure after the 200 as a `data: {"error": ...}` event
    openai_server.script = OpenAIScript(error_after=1)
    error, pieces = await failure(provider)
    assert pieces == ["Hello"]
    assert error.code == "PROVIDER_ERROR"
    assert error.before_output is False
    assert "Context size has been exceeded." in str(error.__cause__)


async def test_a_server_that_never_answers_times_out(openai_server: OpenAIServer) -> None:
    openai_server.reset()
    openai_server.script = OpenAIScript(hang=True)
    provider = await make_provider(openai_server, timeout_seconds=0.3)
    try:
        error, _ = await failure(provider)
    finally:
        await provider.aclose()
    assert (error.code, error.before_output) == ("PROVIDER_TIMEOUT", True)


async def test_a_stream_that_stalls_times_out_after_output(openai_server: OpenAIServer) -> None:
    openai_server.reset()
    openai_server.script = OpenAIScript(hang_after=1)
    provider = await make_provider(openai_server, timeout_seconds=0.3)
    try:
        error, pieces = await failure(provider)
    finally:
        await provider.aclose()
    assert pieces == ["Hello"]
    assert (error.code, error.before_output) == ("PROVIDER_TIMEOUT", False)
    # giving up closed the connection
    assert await openai_server.wait_disconnected()


async def test_an_unreachable_server_is_a_provider_error_before_output() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ModelConfig(provider="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1")
    provider = await create_openai_provider("gpt", config, Settings())
    try:
        error, _ = await failure(provider)
    finally:
        await provider.aclose()
    assert (error.code, error.before_output) == ("PROVIDER_ERROR", True)


# -- stopping ----------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_upstream_connection(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(pieces=["x"] * 100, delay=0.02)
    stream = provider.stream(REQUEST, StreamOutcome())
    assert [await anext(stream), await anext(stream)] == ["x", "x"]
    await stream.aclose()
    assert await openai_server.wait_disconnected()
    assert not openai_server.streams[-1].completed
    assert openai_server.streams[-1].sent < 100


def suspended_generators() -> set[types.AsyncGeneratorType[object, object]]:
    return {
        g
        for g in gc.get_objects()
        if isinstance(g, types.AsyncGeneratorType) and g.ag_frame is not None
    }


@pytest.mark.parametrize("how", ["aclose", "cancel", "to the end"])
async def test_no_generator_of_the_sdk_waits_for_the_garbage_collector(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer, how: str
) -> None:
    """A stream stopped early (aclose, as the exchange does on a stop or a disconnect)
    left the SDK's generators, its SSE decoder down to httpx's `Response.aiter_raw`,
    suspended in a reference cycle: collected whenever the garbage collector ran, maybe
    after their event loop was gone, they failed a later test with
    PytestUnraisableExceptionWarning. With the collector off, every generator the stream
    opened must end on this loop by itself."""
    pieces = 3 if how == "to the end" else 100
    openai_server.script = OpenAIScript(pieces=["x"] * pieces, delay=0.05)
    gc.collect()
    gc.disable()
    try:
        before = suspended_generators()
        stream = provider.stream(REQUEST, StreamOutcome())
        if how == "aclose":
            assert [await anext(stream), await anext(stream)] == ["x", "x"]
            await stream.aclose()
        elif how == "cancel":
            received: list[str] = []

            async def consume() -> None:
                async for piece in stream:
                    received.append(piece)

            consuming = asyncio.create_task(consume())
            await eventually(lambda: len(received) >= 2)
            consuming.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consuming
        else:
            assert [piece async for piece in stream] == ["x"] * 3
        await eventually(lambda: not suspended_generators() - before)
    finally:
        gc.enable()


async def test_cancelling_the_consumer_closes_the_upstream_connection(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(pieces=["x"] * 100, delay=0.02)
    streaming = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(REQUEST, StreamOutcome()):
            streaming.set()

    task = asyncio.create_task(consume())
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await openai_server.wait_disconnected()
    assert not openai_server.streams[-1].completed


# -- counting ----------------------------------------------------------------------------


async def test_count_tokens_uses_the_servers_tokenizer(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    texts = ["You are terse.", "What is two plus two?", ""]
    assert await provider.count_tokens(texts) == [fake_token_count(t) for t in texts]
    assert sorted(openai_server.tokenized) == sorted(texts)
    assert {r.path for r in openai_server.requests} == {"/tokenize"}


async def test_count_tokens_without_tokenize_fails_once_then_stops_asking(
    provider: OpenAICompatibleProvider, openai_server: OpenAIServer
) -> None:
    openai_server.script = OpenAIScript(tokenize=False)
    with pytest.raises(ProviderError, match="404"):
        await provider.count_tokens(["hello"])
    asked = len(openai_server.requests)
    with pytest.raises(ProviderError):
        await provider.count_tokens(["hello"])
    assert len(openai_server.requests) == asked
