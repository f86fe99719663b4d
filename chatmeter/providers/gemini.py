"""Gemini through the official `google-genai` SDK (SPEC section 8).

Streams with `generate_content_stream`, counts with `count_tokens`, and maps what the SDK
raises to the stream error codes of the contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import httpx
from google import genai
from google.genai import errors, types

from chatmeter.config import ConfigError, ModelConfig, Settings, model_api_key
from chatmeter.providers.base import GenerationRequest, ProviderError, StreamOutcome, Usage

try:
    # The SDK sends through httpx2 when it is installed (google-genai 3.x depends on it),
    # else through httpx; either may raise.
    import httpx2

    _TIMEOUTS: tuple[type[BaseException], ...] = (
        TimeoutError,
        httpx.TimeoutException,
        httpx2.TimeoutException,
    )
except ImportError:  # pragma: no cover - older SDKs only bring httpx
    _TIMEOUTS = (TimeoutError, httpx.TimeoutException)

_BLOCKED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
    }
)
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"} | dict.fromkeys(
    _BLOCKED, "content_filter"
)

# What the pump task hands to the consumer: a chunk, the failure, or None at the end.
_Item = types.GenerateContentResponse | Exception | None


def _finish_reason(reason: types.FinishReason) -> str:
    return _FINISH_REASONS.get(reason.value, reason.value.lower())


def _usage(metadata: types.GenerateContentResponseUsageMetadata) -> Usage:
    return Usage(
        prompt_tokens=metadata.prompt_token_count or 0,
        completion_tokens=metadata.candidates_token_count or 0,
        thinking_tokens=metadata.thoughts_token_count or 0,
        cached_tokens=metadata.cached_content_token_count or 0,
    )


def _reply_texts(chunk: types.GenerateContentResponse) -> list[str]:
    if not chunk.candidates or not chunk.candidates[0].content:
        return []
    parts = chunk.candidates[0].content.parts or []
    # thought summaries are the model's reasoning, billed as thinking but never the reply
    return [part.text for part in parts if part.text and not part.thought]


def _contents(request: GenerationRequest) -> list[types.Content]:
    return [
        types.Content(
            role="model" if turn.role == "assistant" else "user",
            parts=[types.Part(text=turn.content)],
        )
        for turn in request.turns()
    ]


def _mapped(exc: Exception, *, before_output: bool) -> ProviderError:
    if isinstance(exc, errors.APIError):
        if exc.code == 429:
            return ProviderError(
                "PROVIDER_RATE_LIMITED",
                "The Gemini API is rate limiting requests; try again shortly.",
                before_output=before_output,
            )
        status = f" {exc.status}" if exc.status else ""
        return ProviderError(
            "PROVIDER_ERROR",
            f"The Gemini API returned an error ({exc.code}{status}).",
            before_output=before_output,
        )
    if isinstance(exc, _TIMEOUTS):
        return ProviderError(
            "PROVIDER_TIMEOUT",
            "The Gemini API did not answer in time.",
            before_output=before_output,
        )
    # Connection drops, truncated streams and unreadable chunks all end up here.
    return ProviderError(
        "PROVIDER_ERROR",
        "The connection to the Gemini API failed before the reply was complete.",
        before_output=before_output,
    )


class GeminiProvider:
    """One configured Gemini model."""

    def __init__(self, name: str, config: ModelConfig, *, api_key: str) -> None:
        self.name = name
        self.counts_locally = False  # countTokens is a call to Gemini's API
        self._model = config.model
        self._client = genai.Client(
            # explicit, so GOOGLE_GENAI_USE_VERTEXAI in the environment cannot reroute us
            vertexai=False,
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=config.base_url,
                # milliseconds; the SDK applies it to each read, so it bounds idle gaps
                timeout=max(1, round(config.timeout_seconds * 1000)),
            ),
        )

    async def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        config = types.GenerateContentConfig(
            system_instruction=request.system_prompt or None,
            max_output_tokens=request.max_output_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            stop_sequences=list(request.sampling.stop) or None,
        )
        chunks: asyncio.Queue[_Item] = asyncio.Queue()
        # The SDK nests several async generators around the HTTP response and closing the
        # outer one does not close the inner ones (the response would linger until garbage
        # collection, still generating and billing). So a task reads the stream and is
        # cancelled to stop it: cancellation lands on the pending socket read and unwinds
        # every layer, closing the HTTP response on its way out.
        pump = asyncio.create_task(self._pump(_contents(request), config, chunks))
        yielded = False
        blocked = False
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, Exception):
                    before_output = not yielded and outcome.usage is None
                    raise _mapped(item, before_output=before_output) from item
                if item.usage_metadata is not None:
                    outcome.usage = _usage(item.usage_metadata)
                if item.prompt_feedback and item.prompt_feedback.block_reason:
                    blocked = True
                if item.candidates and item.candidates[0].finish_reason:
                    outcome.finish_reason = _finish_reason(item.candidates[0].finish_reason)
                for text in _reply_texts(item):
                    yielded = True
                    yield text
        finally:
            pump.cancel()
            await asyncio.wait({pump})
            # Chunks read ahead but not handed out (a stop or a disconnect) were still
            # generated and billed by Gemini: keep the latest usage they carry.
            while not chunks.empty():
                item = chunks.get_nowait()
                if item is not None and not isinstance(item, Exception) and item.usage_metadata:
                    outcome.usage = _usage(item.usage_metadata)
        if blocked:
            raise ProviderError(
                "CONTENT_BLOCKED", "Gemini blocked this message.", before_output=True
            )
        if outcome.finish_reason == "content_filter" and not yielded:
            raise ProviderError(
                "CONTENT_BLOCKED",
                "Gemini blocked the reply.",
                before_output=outcome.usage is None,
            )
        if outcome.finish_reason is None:
            # Gemini always ends a reply with a finish reason: the stream was cut short.
            raise ProviderError(
                "PROVIDER_ERROR",
                "The Gemini stream ended before the reply was complete.",
                before_output=not yielded and outcome.usage is None,
            )

    async def _pump(
        self,
        contents: list[types.Content],
        config: types.GenerateContentConfig,
        chunks: asyncio.Queue[_Item],
    ) -> None:
        try:
            stream = await self._client.aio.models.generate_content_stream(
                model=self._model, contents=contents, config=config
            )
            async for chunk in stream:
                chunks.put_nowait(chunk)
        except Exception as exc:
            chunks.put_nowait(exc)
        else:
            chunks.put_nowait(None)

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return list(await asyncio.gather(*(self._count(text) for text in texts)))

    async def _count(self, text: str) -> int:
        if not text:
            return 0  # the API refuses empty content; it has no tokens anyway
        try:
            # The system prompt is counted as plain content: countTokens refuses
            # system_instruction on the Gemini API.
            response = await self._client.aio.models.count_tokens(model=self._model, contents=text)
        except Exception as exc:
            raise ProviderError(
                "PROVIDER_ERROR", "Gemini could not count tokens.", before_output=True
            ) from exc
        return response.total_tokens or 0

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()


async def create_gemini_provider(
    name: str, config: ModelConfig, settings: Settings
) -> GeminiProvider:
    """The registry's factory for `provider = "gemini"` models."""
    api_key = model_api_key(config)
    if not config.api_key_env:
        raise ConfigError(f"models.{name}.api_key_env: name the variable holding the API key")
    if not api_key:
        raise ConfigError(f"models.{name}: set {config.api_key_env} to the Gemini API key")
    return GeminiProvider(name, config, api_key=api_key)
