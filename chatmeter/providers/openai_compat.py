"""The `openai` provider: any OpenAI-compatible Chat Completions server (OpenAI, vLLM,
Ollama, llama.cpp server, LM Studio), through the official `openai` SDK.

The embedded `local` model (`local.py`) speaks the same protocol in process: it shares the
messages, the usage mapping and the `/tokenize` counting defined here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from urllib.parse import urlsplit

import httpx
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from chatmeter.config import ModelConfig, Settings, model_api_key
from chatmeter.providers.base import (
    ErrorCode,
    GenerationRequest,
    ProviderError,
    Role,
    StreamOutcome,
    Usage,
)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# The SDK refuses to start without a key; local servers (llama.cpp, Ollama, vLLM without
# --api-key) ignore whatever is sent.
PLACEHOLDER_API_KEY = "not-needed"


class OpenAICompatibleProvider:
    """Streams replies from a Chat Completions server and counts tokens with its
    `/tokenize` endpoint when it has one (llama.cpp, vLLM)."""

    def __init__(
        self,
        name: str,
        *,
        model: str,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
    ) -> None:
        self.name = name
        # its /tokenize is a call to the server: the opening makes none (zero count calls)
        self.counts_locally = False
        self._model = model
        base_url = base_url or OPENAI_BASE_URL
        # max_retries=0: a retry would resend a prompt the server may already bill, and
        # the caller decides what a failure costs; it must see the first one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or PLACEHOLDER_API_KEY,
            timeout=timeout,
            max_retries=0,
        )
        self._tokenizer = Tokenizer(name, server_root(base_url), api_key, timeout)
        self._cap_is_completion_tokens = caps_with_max_completion_tokens(base_url)

    async def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        cap = request.max_output_tokens
        modern = self._cap_is_completion_tokens
        sampling = request.sampling
        try:
            stream = await self._client.chat.completions.create(
                model=self._model,
                messages=chat_messages(request),
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=openai.omit if modern else cap,
                max_completion_tokens=cap if modern else openai.omit,
                temperature=_or_omit(sampling.temperature),
                top_p=_or_omit(sampling.top_p),
                stop=list(sampling.stop) if sampling.stop else openai.omit,
            )
        except openai.APIError as exc:
            raise _provider_error(exc, before_output=True) from exc

        wrote = False
        chunks = aiter(stream)
        try:
            async for chunk in chunks:
                # Usage comes in a last chunk with no choices; some servers (vLLM with
                # continuous usage) repeat it on every chunk, so the last one wins.
                if chunk.usage is not None:
                    outcome.usage = usage_from(chunk.usage)
                # one choice is asked for; a server that sends others too (ignoring
                # `n`) may put one first, which is not the reply. A choice without an
                # index (the SDK reads None) is a lone one's: the reply
                for choice in (c for c in chunk.choices if not c.index):
                    if choice.finish_reason:
                        outcome.finish_reason = choice.finish_reason
                    if choice.delta.content:
                        wrote = True
                        yield choice.delta.content
        except (openai.APIError, ValueError) as exc:
            # ValueError: a data line that is not JSON; the stream is unusable either way.
            # The stream body's own transport errors reach us wrapped by the SDK
            # (APIConnectionError / APITimeoutError).
            before = not wrote and outcome.usage is None
            raise _provider_error(exc, before_output=before) from exc
        finally:
            # Runs on normal end, on error, on aclose() and on task cancellation: closing
            # the response closes the HTTP connection, which is how a Chat Completions
            # server learns to stop generating (llama.cpp cancels the slot's task).
            await stream.close()
            await _finish(chunks)

        if outcome.finish_reason == "content_filter" and not wrote:
            raise ProviderError(
                "CONTENT_BLOCKED",
                "the model's safety filter blocked the reply",
                before_output=outcome.usage is None,
            )

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return await self._tokenizer.count(texts)

    async def aclose(self) -> None:
        await self._client.close()
        await self._tokenizer.aclose()


class Tokenizer:
    """Exact counts from a server's `/tokenize` (llama.cpp, vLLM), until it shows it has
    none (OpenAI, Ollama)."""

    def __init__(self, name: str, root: str, api_key: str | None, timeout: float) -> None:
        self._name = name
        # /tokenize is not under /v1 (llama.cpp, vLLM) and needs the key like any call.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=root, headers=headers, timeout=timeout)
        self._can_tokenize = True

    async def count(self, texts: list[str]) -> list[int]:
        if not self._can_tokenize:
            raise ProviderError("PROVIDER_ERROR", f"{self._name} cannot count tokens")
        return list(await asyncio.gather(*(self._tokenize(text) for text in texts)))

    async def _tokenize(self, text: str) -> int:
        # `content` is llama.cpp's field and `prompt` vLLM's; each ignores the other.
        # Special tokens (BOS) are left out: texts are counted one by one and summed.
        body = {"content": text, "prompt": text, "add_special_tokens": False}
        try:
            response = await self.http.post("/tokenize", json=body)
        except httpx.HTTPError as exc:
            raise ProviderError("PROVIDER_ERROR", f"tokenize failed: {exc!r}") from exc
        if response.is_success:
            tokens = response.json().get("tokens")
            if isinstance(tokens, list):
                return len(tokens)
            raise ProviderError("PROVIDER_ERROR", "tokenize answered without a token list")
        if _is_permanent(response.status_code):
            # No such endpoint (OpenAI, Ollama) or a body it will never accept: stop asking.
            self._can_tokenize = False
        raise ProviderError("PROVIDER_ERROR", f"tokenize answered HTTP {response.status_code}")

    async def aclose(self) -> None:
        await self.http.aclose()


async def create_openai_provider(
    name: str, config: ModelConfig, settings: Settings
) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(
        name,
        model=config.model,
        base_url=config.base_url,
        api_key=model_api_key(config),
        timeout=config.timeout_seconds,
    )


def server_root(base_url: str) -> str:
    """`http://host:8080/v1` -> `http://host:8080`: where `/tokenize` lives."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def caps_with_max_completion_tokens(base_url: str) -> bool:
    """Which request field caps the reply's length.

    OpenAI deprecated `max_tokens` and its reasoning models (o-series, gpt-5) reject it,
    while Ollama and LM Studio know only `max_tokens` (llama.cpp and vLLM take both). So
    OpenAI's own API gets `max_completion_tokens` and every other server `max_tokens`."""
    return urlsplit(base_url).hostname == "api.openai.com"


def usage_from(usage: CompletionUsage) -> Usage:
    """Map OpenAI usage onto ours without billing reasoning twice: OpenAI counts reasoning
    tokens inside `completion_tokens`, we keep them apart as thinking tokens."""
    details = usage.completion_tokens_details
    reasoning = (details.reasoning_tokens or 0) if details else 0
    prompt_details = usage.prompt_tokens_details
    cached = (prompt_details.cached_tokens or 0) if prompt_details else 0
    completion = usage.completion_tokens or 0
    reasoning = min(reasoning, completion)
    return Usage(
        prompt_tokens=usage.prompt_tokens or 0,
        completion_tokens=completion - reasoning,
        thinking_tokens=reasoning,
        cached_tokens=cached,
    )


def _or_omit(value: float | None) -> float | openai.Omit:
    # left out, not sent as null: the server's default applies
    return openai.omit if value is None else value


def chat_messages(request: GenerationRequest) -> list[ChatCompletionMessageParam]:
    return [
        _message("system", request.system_prompt),
        *(_message(turn.role, turn.content) for turn in request.turns()),
    ]


def _message(role: Role, content: str) -> ChatCompletionMessageParam:
    # Spelled out per role because the SDK types each role's message separately.
    if role == "system":
        return {"role": "system", "content": content}
    if role == "user":
        return {"role": "user", "content": content}
    return {"role": "assistant", "content": content}


async def _finish(chunks: AsyncIterator[ChatCompletionChunk]) -> None:
    """End the SDK's chain of async generators (its SSE decoder down to httpx's
    `aiter_raw`) on this loop. Closing the response does not: left suspended when we stop
    reading early, they are finalized whenever the garbage collector reaches them, maybe
    after their event loop is gone. Read after the close, the chain fails at its bottom and
    every generator in it ends."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):  # never wait on a connection that is closed
            async for _ in chunks:
                pass


def _is_permanent(status: int) -> bool:
    return status == 501 or (400 <= status < 500 and status not in (408, 429))


def _provider_error(exc: Exception, *, before_output: bool) -> ProviderError:
    # The message reaches the end user, so it names the failure and not the upstream's own
    # text (OpenAI's mention the organisation id); that stays on the chained cause for logs.
    code: ErrorCode = "PROVIDER_ERROR"
    if isinstance(exc, openai.RateLimitError):
        code = "PROVIDER_RATE_LIMITED"
    elif isinstance(exc, openai.APITimeoutError):
        code = "PROVIDER_TIMEOUT"
    return ProviderError(code, _describe(exc), before_output=before_output)


def _describe(exc: Exception) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "the model server did not answer in time"
    if isinstance(exc, openai.APIConnectionError):
        return "the connection to the model server failed or was cut"
    if isinstance(exc, openai.APIStatusError):
        return f"the model server answered HTTP {exc.status_code}"
    if isinstance(exc, openai.APIError):
        return "the model server reported an error in the stream"
    return "the model server sent an unreadable stream"
