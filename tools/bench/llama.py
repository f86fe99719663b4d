"""The local model without chatmeter: llama.cpp's own server (xllamacpp) with the same GGUF
and the same parameters as chatmeter's `local` provider, in a process of its own, and a
client that streams one reply from it -- or from chatmeter -- and times the tokens.

    python -m tools.bench.llama    # prints `READY <address> <api key>`, serves until
                                       # stdin closes; the model is CHATMETER_CONFIG's `local`
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from chatmeter.config import load_settings
from chatmeter.providers.local import _start_server, find_smollm2_gguf

LOCAL_MODEL = "local"
LONG_ANSWER_PROMPT = (
    "Explain in detail, step by step, how a web server handles an HTTP request, "
    "from the TCP connection to the response. Write at least ten paragraphs."
)


@dataclass(frozen=True, slots=True)
class GenerationTiming:
    """One streamed reply. Times in seconds from the request being sent."""

    completion_tokens: int
    first_piece: float
    last_piece: float
    end: float
    reported_tokens_per_second: float | None  # llama.cpp's own `timings`, when seen

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed as the client sees it: tokens after the first, over the time
        from the first piece to the last."""
        span = self.last_piece - self.first_piece
        return (self.completion_tokens - 1) / span if span > 0 else 0.0


def _data_lines(line: str) -> Any:
    return orjson.loads(line[5:]) if line.startswith("data:") else None


async def time_llama(
    client: httpx.AsyncClient, system_prompt: str, max_tokens: int
) -> GenerationTiming:
    """One reply from llama.cpp's /v1/chat/completions, as chatmeter's adapter asks it."""
    body = {
        "model": "local",
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": LONG_ANSWER_PROMPT},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
    }
    first = last = 0.0
    tokens, reported = 0, None
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = _data_lines(line)
            now = time.perf_counter() - start
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or now
                    last = now
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if chunk.get("timings"):
                reported = float(chunk["timings"]["predicted_per_second"])
    return GenerationTiming(tokens, first, last, time.perf_counter() - start, reported)


async def time_chatmeter(client: httpx.AsyncClient, chat_id: str, token: str) -> GenerationTiming:
    """One reply through chatmeter's stream, in a fresh chat (so the prompt is the same)."""
    first = last = 0.0
    tokens = 0
    start = time.perf_counter()
    async with client.stream(
        "POST",
        f"/api/chat/{chat_id}/message",
        json={"message": LONG_ANSWER_PROMPT},
        headers={"Authorization": f"Bearer {token}"},
    ) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            event = _data_lines(line)
            if event is None:
                continue
            now = time.perf_counter() - start
            if event.get("error"):
                raise RuntimeError(f"chatmeter answered an error event: {event}")
            if event.get("done"):
                tokens = int(event["usage"]["completion_tokens"])
            elif event.get("chunk"):
                first = first or now
                last = now
    return GenerationTiming(tokens, first, last, time.perf_counter() - start, None)


def main() -> None:
    """Host llama.cpp's server for the benchmark until stdin closes."""
    config = load_settings().models[LOCAL_MODEL]
    path = Path(config.model_path) if config.model_path else find_smollm2_gguf()
    api_key = secrets.token_urlsafe(24)
    server = _start_server(path, config, api_key)
    print(f"READY {server.listening_address} {api_key}", flush=True)
    sys.stdin.read()  # the benchmark closes our stdin when it is done
    del server


if __name__ == "__main__":
    main()
