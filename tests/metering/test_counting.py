"""The token counter's caches (SPEC section 6, `counting.TokenCounter`): a count is what
the tokenizer said, whatever the bounded cache evicted meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from chatmeter.metering.counting import TokenCounter
from chatmeter.observability.metrics import Metrics
from chatmeter.providers.base import GenerationRequest, StreamOutcome


class LengthCounter:
    """A provider whose tokenizer counts characters; `gate`, when set, holds each count
    call until it is set."""

    def __init__(self) -> None:
        self.name = "lengths"
        self.counts_locally = True
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        raise NotImplementedError

    async def count_tokens(self, texts: list[str]) -> list[int]:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        return [len(text) for text in texts]

    async def aclose(self) -> None:
        return None


async def test_a_call_counting_more_texts_than_the_cache_holds_counts_each() -> None:
    counter = TokenCounter(Metrics(), max_entries=2)
    provider = LengthCounter()
    assert await counter.sizes(provider, ["aaaa", "bbb", "cc"]) == [4, 3, 2]
    assert await counter.count(provider, "", ["aaaa", "bbb", "cc", "d"]) == 10


async def test_a_cached_count_evicted_while_another_text_is_counted_still_counts() -> None:
    counter = TokenCounter(Metrics(), max_entries=2)
    provider = LengthCounter()
    assert await counter.sizes(provider, ["cached"]) == [6]
    gate = provider.gate = asyncio.Event()
    slow = asyncio.create_task(counter.sizes(provider, ["cached", "new one"]))
    await provider.waiting.wait()
    provider.gate = None  # other requests' counts fill the cache meanwhile
    assert await counter.sizes(provider, ["x", "yy"]) == [1, 2]
    gate.set()
    assert await slow == [6, 7]
