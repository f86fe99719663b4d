"""The one small interface every model provider implements.

A provider streams text pieces and, when the stream ends, knows the usage the provider
reported (if any). It never touches the database or the web framework.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One message of the conversation as sent to the provider."""

    role: Role
    content: str


# the most tokens a provider's report may give one figure of one exchange: hundreds of
# times the longest context of today's models, and far from what the ledger's 64-bit
# sums hold (a report past it is a broken upstream's, not a bill)
MOST_TOKENS_REPORTED = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as the provider reported it (or as counted or estimated)."""

    prompt_tokens: int
    completion_tokens: int
    thinking_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        # cached tokens are part of prompt_tokens already (Gemini and OpenAI alike)
        return self.prompt_tokens + self.completion_tokens + self.thinking_tokens

    @property
    def is_possible(self) -> bool:
        """Whether one exchange can have used this: whole tokens only (an SDK passes a
        stream's usage on unchecked: 10.5 was billed as it came), no figure below 0 (a bill
        that would credit the user) or past `MOST_TOKENS_REPORTED`, no more cached than
        prompt."""
        figures = (self.prompt_tokens, self.completion_tokens, self.thinking_tokens)
        return (
            all(type(figure) is int for figure in (*figures, self.cached_tokens))
            and all(0 <= figure <= MOST_TOKENS_REPORTED for figure in figures)
            and 0 <= self.cached_tokens <= self.prompt_tokens
        )


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the client asks the model to sample (`/v1`, SPEC section 12), already checked
    against OpenAI's ranges. None and () leave the provider's or model's default."""

    temperature: float | None = None  # 0..2
    top_p: float | None = None  # 0..1
    stop: tuple[str, ...] = ()  # at most 4, none empty: the reply ends before the first


DEFAULT_SAMPLING = Sampling()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Everything a provider needs for one reply."""

    system_prompt: str
    history: tuple[ChatTurn, ...]
    message: str
    max_output_tokens: int
    sampling: Sampling = DEFAULT_SAMPLING

    def turns(self) -> list[ChatTurn]:
        """History then the user message (the system prompt is kept apart)."""
        return [*self.history, ChatTurn("user", self.message)]


@dataclass(slots=True)
class StreamOutcome:
    """What a finished (or aborted) stream left behind: filled in while streaming."""

    usage: Usage | None = None
    finish_reason: str | None = None


ErrorCode = Literal[
    "PROVIDER_ERROR", "PROVIDER_RATE_LIMITED", "PROVIDER_TIMEOUT", "CONTENT_BLOCKED"
]


class ProviderError(Exception):
    """A provider failure, already mapped to a stream error code of the contract."""

    def __init__(self, code: ErrorCode, message: str, *, before_output: bool = False) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        # True when the provider refused the request before generating anything:
        # such an exchange bills nothing (SPEC section 5).
        self.before_output = before_output


class Provider(Protocol):
    """A model behind chatmeter. One instance per configured model."""

    name: str
    # True when count_tokens costs no call to the provider's API (a tokenizer in this
    # process or beside it): the opening then counts what the cheap bound left out
    counts_locally: bool

    def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        """Yield the reply's text pieces as they arrive; set `outcome.usage` (when the
        provider reports usage) and `outcome.finish_reason` before finishing.

        Raises ProviderError for failures. An async generator, so the caller can aclose()
        it; closing or cancelling it must end the upstream call."""
        ...

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Exact token counts of each text with the model's own tokenizer.

        Raises ProviderError when counting is not available."""
        ...

    async def aclose(self) -> None:
        """Release clients and processes."""
        ...
