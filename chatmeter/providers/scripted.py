"""A deterministic provider with no model behind it, for tests and benchmarks (SPEC §2).

It streams `reply` in `chunks` pieces with `delay_ms` before each, and reports usage as
ceil(len(text) / 4) per text: the prompt (system prompt, history, message) and the reply.
Of the sampling parameters it honours `stop`: the reply ends before the first stop
sequence, as a model's does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator

from chatmeter.config import ModelConfig
from chatmeter.providers.base import GenerationRequest, StreamOutcome, Usage


def scripted_count(text: str) -> int:
    return math.ceil(len(text) / 4)


def split_into(text: str, pieces: int) -> list[str]:
    """`text` cut into at most `pieces` non-empty pieces of near-equal length."""
    pieces = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return [piece for piece in out if piece]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest of the stop sequences it contains."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return text[: min(found)] if found else text


def clipped(pieces: list[str], length: int) -> list[str]:
    """The pieces, cut so that together they are the first `length` characters."""
    out, start = [], 0
    for piece in pieces:
        if start >= length:
            break
        out.append(piece[: length - start])
        start += len(piece)
    return out


class ScriptedProvider:
    def __init__(self, name: str, config: ModelConfig) -> None:
        self.name = name
        self.counts_locally = True
        self._config = config
        self._pieces = split_into(config.reply, config.chunks)
        self._delay = config.delay_ms / 1000

    async def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        texts = [request.system_prompt, *(t.content for t in request.history), request.message]
        prompt_tokens = sum(scripted_count(t) for t in texts)
        reply = cut_at_stop(self._config.reply, request.sampling.stop)
        pieces = self._pieces if reply == self._config.reply else clipped(self._pieces, len(reply))
        sent = 0
        reply_tokens_cap = request.max_output_tokens
        for piece in pieces:
            # honour the output cap the way a real model does: stop at the limit
            if scripted_count(reply[: sent + len(piece)]) > reply_tokens_cap:
                outcome.finish_reason = "length"
                break
            if self._delay:
                await asyncio.sleep(self._delay)
            sent += len(piece)
            yield piece
        else:
            outcome.finish_reason = "stop"
        if self._config.usage == "last":
            outcome.usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=scripted_count(reply[:sent]),
            )

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return [scripted_count(text) for text in texts]

    async def aclose(self) -> None:
        return None
