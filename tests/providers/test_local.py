"""The `local` provider: SmolLM2-135M-Instruct through llama.cpp (xllamacpp), for real.

The model loads once for the module (about a second); every test shares it."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatmeter.config import ModelConfig, Settings
from chatmeter.providers.base import (
    ChatTurn,
    GenerationRequest,
    ProviderError,
    Sampling,
    StreamOutcome,
)
from chatmeter.providers.local import LocalProvider, create_local_provider, find_smollm2_gguf
from tests.support.waiting import eventually

CONFIG = ModelConfig(
    provider="local",
    model="SmolLM2-135M-Instruct",
    context_window=2048,
    parallel=2,
    threads=2,
    timeout_seconds=30,
)
REQUEST = GenerationRequest(
    system_prompt="You are a helpful assistant.",
    history=(ChatTurn("user", "Hi!"), ChatTurn("assistant", "Hello! How can I help?")),
    message="Name three colours.",
    max_output_tokens=24,
)
LONG_STORY = GenerationRequest(
    system_prompt="You are a storyteller.",
    history=(),
    message="Tell me a very long story about a dragon and a knight.",
    max_output_tokens=1500,
)


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[LocalProvider]:
    provider = await create_local_provider("local", CONFIG, Settings())
    yield provider
    await provider.aclose()


async def llama(provider: LocalProvider, method: str, path: str, **kwargs: Any) -> Any:
    """Ask llama.cpp itself, with the provider's client (it carries the server's key)."""
    response = await provider._tokenizer.http.request(method, path, **kwargs)
    response.raise_for_status()
    return response.json()


async def slots_busy(provider: LocalProvider) -> int:
    return sum(slot["is_processing"] for slot in await llama(provider, "GET", "/slots"))


async def test_a_real_reply_comes_with_llama_cpp_exact_usage(local: LocalProvider) -> None:
    outcome = StreamOutcome()
    pieces = [piece async for piece in local.stream(REQUEST, outcome)]
    assert len(pieces) > 1
    assert "".join(pieces).strip()
    assert outcome.usage is not None and outcome.finish_reason in ("stop", "length")
    assert 0 < outcome.usage.completion_tokens <= REQUEST.max_output_tokens
    assert outcome.usage.thinking_tokens == 0

    # prompt_tokens is exactly the model's own tokenization of the templated prompt
    messages = [
        {"role": "system", "content": REQUEST.system_prompt},
        *({"role": t.role, "content": t.content} for t in REQUEST.history),
        {"role": "user", "content": REQUEST.message},
    ]
    template = await llama(local, "POST", "/apply-template", json={"messages": messages})
    tokens = await llama(local, "POST", "/tokenize", json={"content": template["prompt"]})
    assert outcome.usage.prompt_tokens == len(tokens["tokens"])
    assert await local.count_tokens([template["prompt"]]) == [outcome.usage.prompt_tokens]


async def test_the_output_cap_is_obeyed(local: LocalProvider) -> None:
    outcome = StreamOutcome()
    request = dataclasses.replace(LONG_STORY, max_output_tokens=4)
    pieces = [piece async for piece in local.stream(request, outcome)]
    assert outcome.finish_reason == "length"
    assert outcome.usage is not None and outcome.usage.completion_tokens == 4
    assert 0 < len(pieces) <= 4


async def reply_to(local: LocalProvider, sampling: Sampling) -> tuple[str, StreamOutcome]:
    outcome = StreamOutcome()
    request = dataclasses.replace(REQUEST, sampling=sampling, max_output_tokens=40)
    return "".join([piece async for piece in local.stream(request, outcome)]), outcome


async def test_sampling_reaches_llama_cpp(local: LocalProvider) -> None:
    """Temperature 0 is greedy, so the reply repeats; a stop sequence taken from it ends
    the next one just before it, and llama.cpp's slot shows the temperature and top_p."""
    greedy, outcome = await reply_to(local, Sampling(temperature=0.0))
    assert (await reply_to(local, Sampling(temperature=0.0)))[0] == greedy
    # a middle word with the blank before it, whichever blank that is: the greedy reply
    # is this machine's (another CPU's arithmetic or llama.cpp build may give another),
    # and a list ("Three fruits:\n1. Bananas\n2. Apples") has words after a newline,
    # which " " + word is not found in
    words = [blank_and_word.group() for blank_and_word in re.finditer(r"\s\S+", greedy)]
    assert len(words) >= 3, greedy
    stop = words[len(words) // 2]
    cut, stopped = await reply_to(local, Sampling(temperature=0.0, top_p=0.25, stop=(stop,)))
    assert cut == greedy[: greedy.index(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.usage is not None and outcome.usage is not None
    assert 0 < stopped.usage.completion_tokens < outcome.usage.completion_tokens
    slots = await llama(local, "GET", "/slots")
    used = [slot["params"] for slot in slots if "params" in slot]  # idle ones have none
    assert any(p.get("temperature") == 0.0 and p.get("top_p") == 0.25 for p in used), slots


async def test_count_tokens_is_the_models_tokenizer(local: LocalProvider) -> None:
    # SmolLM2's vocabulary: "Hello" " world"; its chat markers are single special tokens
    counts = await local.count_tokens(["Hello world", "", "<|im_start|>user"])
    assert counts == [2, 0, 2]


async def slot_freed(local: LocalProvider, failure: str) -> None:
    try:
        await eventually(lambda: slots_free(local), within=10)
    except AssertionError:
        raise AssertionError(failure) from None


async def slots_free(local: LocalProvider) -> bool:
    return await slots_busy(local) == 0


async def test_closing_the_stream_stops_generation(local: LocalProvider) -> None:
    stream = local.stream(LONG_STORY, StreamOutcome())
    for _ in range(3):
        await anext(stream)
    assert await slots_busy(local) == 1
    await stream.aclose()

    # llama.cpp is told to stop at the next chunk and frees the slot at once, not after
    # the 1500 tokens (about 15 s) it was asked for
    # (10 s: generous for a busy machine, and still well short of the whole reply)
    await slot_freed(local, "llama.cpp kept generating after the close")


async def test_cancelling_the_consumer_stops_generation(local: LocalProvider) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in local.stream(LONG_STORY, StreamOutcome()):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await slot_freed(local, "llama.cpp kept generating after the cancel")


async def test_replies_run_in_parallel_slots(local: LocalProvider) -> None:
    outcomes = [StreamOutcome(), StreamOutcome()]

    async def reply(outcome: StreamOutcome) -> str:
        return "".join([piece async for piece in local.stream(REQUEST, outcome)])

    texts = await asyncio.gather(*(reply(outcome) for outcome in outcomes))
    assert all(texts)
    assert all(o.usage is not None and o.usage.prompt_tokens > 0 for o in outcomes)


async def test_more_replies_than_slots_wait_their_turn(local: LocalProvider) -> None:
    """A reply holds one of the provider's threads (one per slot) while it generates."""
    outcomes = [StreamOutcome() for _ in range(CONFIG.parallel * 2 + 1)]

    async def reply(outcome: StreamOutcome) -> str:
        return "".join([piece async for piece in local.stream(REQUEST, outcome)])

    texts = await asyncio.gather(*(reply(outcome) for outcome in outcomes))
    assert all(texts)
    assert all(o.usage is not None and o.usage.completion_tokens > 0 for o in outcomes)


async def test_a_prompt_beyond_the_context_is_refused_before_output(
    local: LocalProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # a slot holds CONFIG.context_window (2048) tokens; llama.cpp answers its error object
    request = dataclasses.replace(REQUEST, message="word " * 3000)
    outcome = StreamOutcome()
    with pytest.raises(ProviderError) as refused:
        async for _ in local.stream(request, outcome):
            pass
    assert refused.value.code == "PROVIDER_ERROR"
    assert refused.value.before_output
    assert refused.value.message == "the model server answered HTTP 400"
    assert outcome.usage is None
    # llama.cpp's own reason is for the operator, in the log
    assert "exceeds the available context size" in caplog.text
    # and the provider goes on serving
    assert "".join([piece async for piece in local.stream(REQUEST, StreamOutcome())])


async def test_closing_the_provider_ends_its_replies_as_failed() -> None:
    """One slot: a reply generating, another waiting for the slot's thread. Closing the
    provider stops the first in a few pieces, as cut short (not as a reply that ended),
    and ends the second before it starts; neither waits for the 1500 tokens."""
    provider = await create_local_provider(
        "local", CONFIG.model_copy(update={"parallel": 1}), Settings()
    )
    generating = provider.stream(LONG_STORY, StreamOutcome())
    for _ in range(3):
        await anext(generating)
    waiting_outcome = StreamOutcome()
    waiting = asyncio.create_task(anext(provider.stream(REQUEST, waiting_outcome)))
    await eventually(lambda: provider._threads._work_queue.qsize() == 1)  # in line
    await provider.aclose()

    rest: list[str] = []
    with pytest.raises(ProviderError) as cut:
        async for piece in generating:
            rest.append(piece)
    assert cut.value.code == "PROVIDER_ERROR" and not cut.value.before_output
    # what came before the stop (a few pieces; room for a slow machine), not the rest of
    # the 1500 tokens asked for
    assert len(rest) < 200
    with pytest.raises(ProviderError) as never_started:
        await asyncio.wait_for(waiting, 30)  # not forever
    assert never_started.value.before_output and waiting_outcome.usage is None
    with pytest.raises(ProviderError, match="shut down"):
        await anext(provider.stream(REQUEST, StreamOutcome()))


def test_the_gguf_is_found_without_importing_the_package() -> None:
    path = find_smollm2_gguf()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000


async def test_a_missing_model_file_is_a_clear_error(tmp_path: Any) -> None:
    config = CONFIG.model_copy(update={"model_path": str(tmp_path / "nope.gguf")})
    with pytest.raises(ProviderError, match="no GGUF file"):
        await create_local_provider("local", config, Settings())
