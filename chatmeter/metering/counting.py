"""What an exchange is billed when the provider reported no usage (SPEC section 6).

Best first: the provider's own usage; else `counted` with the model's tokenizer (system
prompt + history + user message + the partial reply + a fixed overhead, seed section 2);
else `estimated` at ceil(chars / 4 x 1.05) per text.

Counts are cached (seed section 3): the system prompt's count per (model, prompt) for the
life of the process, other texts in a bounded LRU keyed by (model, hash of the text).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from chatmeter.observability.metrics import Metrics
from chatmeter.providers.base import GenerationRequest, Provider, ProviderError, Usage

log = logging.getLogger("chatmeter.metering")

Source = Literal["provider", "counted", "estimated"]
EXCHANGE_OVERHEAD_TOKENS = 10
# per message of the prompt: role markers and separators of chat templates. ChatML
# (SmolLM2, Qwen) adds 5 tokens to a user's message and 6 to an assistant's (SmolLM2
# splits the role's name in two; ten turns measured 69 tokens above the texts' own
# counts), Llama 3 and Gemma 5: 8 keeps `text_bound` a bound for a message of one byte
# too (4 did not: a prompt of many short messages was billed past the budget that
# reserved it, and passed a context it did not fit), and `counted_prompt` one above
# what the provider bills
PER_MESSAGE_OVERHEAD = 8


def estimate_tokens(text: str) -> int:
    """The seed's estimate of a text's tokens."""
    return math.ceil(len(text) / 4 * 1.05)


def text_bound(text: str) -> int:
    """The most tokens `text` can be as one message of a prompt, with no tokenizer call:
    the byte-level BPE and SentencePiece byte-fallback tokenizers of current models never
    make more tokens than a text has UTF-8 bytes. Summed over a prompt's texts (plus
    EXCHANGE_OVERHEAD_TOKENS), it sizes the reservation, so the budget holds exactly; the
    real figure replaces it at settlement."""
    return len(text.encode("utf-8")) + PER_MESSAGE_OVERHEAD


def counted_prompt(counted: int, texts: int) -> int:
    """A prompt's size from its count, at most what the provider will bill: `counted`
    tokens of the system prompt and of `texts` other texts, plus each message's chat
    template tokens and the exchange's overhead."""
    return counted + (texts + 1) * PER_MESSAGE_OVERHEAD + EXCHANGE_OVERHEAD_TOKENS


def _believable(texts: Sequence[str], counts: list[int]) -> list[int]:
    """A tokenizer's counts of `texts`, if the texts can have them: whole, not below 0
    and within `text_bound` (no tokenizer makes more tokens than a text has bytes). A
    broken upstream's (a proxy's countTokens answering -1000, or 2**31 - 1 for a word) is
    a failed count: believed, a negative prompt reserved less than nothing, a counted
    reply credited the user, or was billed billions of tokens."""
    for text, count in zip(texts, counts, strict=True):
        if type(count) is not int or not 0 <= count <= text_bound(text):
            raise ProviderError("PROVIDER_ERROR", f"the tokenizer counted {count!r} tokens")
    return counts


@dataclass(frozen=True, slots=True)
class Metered:
    usage: Usage
    source: Source


class TokenCounter:
    """Counts with the provider's tokenizer, through the two caches of the seed."""

    def __init__(self, metrics: Metrics, max_entries: int = 4096) -> None:
        self._metrics = metrics
        self._system: dict[tuple[str, str], int] = {}
        self._texts: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._max = max_entries

    async def count(self, provider: Provider, system_prompt: str, texts: Sequence[str]) -> int:
        """Tokens of the system prompt plus each of `texts`, cached."""
        total = await self._count_system(provider, system_prompt)
        return total + sum(await self.sizes(provider, texts))

    async def sizes(self, provider: Provider, texts: Sequence[str]) -> list[int]:
        """Tokens of each of `texts`, cached."""
        keys = [
            (provider.name, hashlib.blake2b(t.encode(), digest_size=16).digest()) for t in texts
        ]
        # this call's counts, apart from the cache: the bounded cache may evict some of
        # them (other calls' counts while this one awaits, or this call's own when it
        # counts more texts than the cache holds), and an evicted count is not 0 tokens
        known: dict[tuple[str, bytes], int] = {}
        missing: dict[tuple[str, bytes], str] = {}
        for key, text in zip(keys, texts, strict=True):
            cached = self._texts.get(key)
            if cached is not None:
                self._texts.move_to_end(key)
                self._metrics.count_cache_hits.inc()
                known[key] = cached
            elif text:
                missing[key] = text
        if missing:
            self._metrics.count_calls.inc(len(missing))
            texts_missing = list(missing.values())
            counts = _believable(texts_missing, await provider.count_tokens(texts_missing))
            for key, value in zip(missing, counts, strict=True):
                known[key] = value
                self._remember(key, value)
        return [known.get(key, 0) for key in keys]

    async def _count_system(self, provider: Provider, system_prompt: str) -> int:
        key = (provider.name, system_prompt)
        if key in self._system:
            self._metrics.count_cache_hits.inc()
            return self._system[key]
        if not system_prompt:
            return 0
        self._metrics.count_calls.inc()
        (value,) = _believable([system_prompt], await provider.count_tokens([system_prompt]))
        self._system[key] = value
        return value

    def _remember(self, key: tuple[str, bytes], value: int) -> None:
        self._texts[key] = value
        self._texts.move_to_end(key)
        while len(self._texts) > self._max:
            self._texts.popitem(last=False)

    async def meter(
        self,
        provider: Provider | None,
        request: GenerationRequest,
        reply: str,
        reported: Usage | None,
    ) -> Metered:
        """The figure to bill for one exchange, and where it came from. A report no
        exchange can have (a negative figure, billions of tokens) is not believed: the
        exchange is counted as if the provider had reported nothing. A counted or
        estimated reply is billed at most the output cap the provider was sent: it cannot
        have generated more, and the reservation (the budget) holds that cap, where
        ceil(chars / 4 x 1.05) of long words, or a tokenizer's count of the reply's text
        run together, may be more."""
        if reported is not None:
            if reported.is_possible:
                return Metered(reported, "provider")
            log.warning("the provider reported impossible usage (%s); counting instead", reported)
        prompt_texts = [*(turn.content for turn in request.history), request.message]
        cap = max(request.max_output_tokens, 0)
        try:
            if provider is None:
                raise ProviderError("PROVIDER_ERROR", "the provider is not available")
            prompt = await self.count(provider, request.system_prompt, prompt_texts)
            completion = await self.count(provider, "", [reply]) if reply else 0
            usage = Usage(prompt + EXCHANGE_OVERHEAD_TOKENS, min(completion, cap))
            return Metered(usage, "counted")
        except ProviderError as exc:
            log.warning("token counting failed (%s); estimating", exc)
        except Exception:
            log.exception("token counting failed; estimating")
        prompt = sum(estimate_tokens(t) for t in [request.system_prompt, *prompt_texts])
        completion = min(estimate_tokens(reply), cap) if reply else 0
        usage = Usage(prompt + EXCHANGE_OVERHEAD_TOKENS, completion)
        return Metered(usage, "estimated")
