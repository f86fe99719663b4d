"""Tokens per second of the local model through chatmeter against llama.cpp's own figure
for the same prompt, from a llama.cpp server started directly in a process of its own."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys

import httpx

from chatmeter.config import load_settings
from tools.bench.harness import Bench
from tools.bench.llama import LOCAL_MODEL, GenerationTiming, time_chatmeter, time_llama
from tools.bench.processes import ServerProcess
from tools.bench.results import LocalModel

READY_TIMEOUT_SECONDS = 120


def start_llama(bench: Bench) -> tuple[subprocess.Popen[bytes], str, str]:
    """llama.cpp's server with the GGUF and parameters of the `local` model; it serves
    until its stdin closes. Returns the process, its address and its API key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATMETER_")}
    env["CHATMETER_CONFIG"] = str(bench.config)
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.bench.llama"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(bench.workdir / "llama.log", "wb"),  # noqa: SIM115 - the child owns it
        env=env,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_SECONDS)
    line = process.stdout.readline().decode() if ready else ""
    if not line.startswith("READY "):
        process.kill()
        raise RuntimeError(f"llama.cpp did not start: {line!r}")
    _, address, api_key = line.split()
    return process, address, api_key


def measure_local_model(bench: Bench, chatmeter: ServerProcess, max_tokens: int) -> LocalModel:
    runs = bench.options.local_runs
    system_prompt = load_settings({"CHATMETER_CONFIG": str(bench.config)}).system_prompt_for(
        LOCAL_MODEL
    )
    # a fresh chat per reply, so chatmeter sends the same prompt each time (no history)
    slots = bench.slots(chatmeter, LOCAL_MODEL, runs + 1)
    bench.say("local model: starting llama.cpp's own server")
    process, address, api_key = start_llama(bench)
    result = LocalModel(max_tokens, [], [])

    async def measure() -> None:
        # a connection per request: each server closes a connection idle for a few
        # seconds (llama.cpp's keep-alive is 5 s) while the other one is timed, and a
        # request sent on a connection closed under it fails
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(base_url=chatmeter.url, timeout=300, limits=fresh) as ours,
            httpx.AsyncClient(
                base_url=address,
                timeout=300,
                headers={"Authorization": f"Bearer {api_key}"},
                limits=fresh,
            ) as theirs,
        ):
            bench.say("local model: warming up (chatmeter loads the model on first use)")
            await time_chatmeter(ours, slots[0].chat_id, slots[0].token)
            await time_llama(theirs, system_prompt, max_tokens)
            for index, slot in enumerate(slots[1:], 1):
                bench.say(f"local model: round {index}/{runs}")
                timing: GenerationTiming = await time_llama(theirs, system_prompt, max_tokens)
                result.llama.append(timing)
                result.chatmeter.append(await time_chatmeter(ours, slot.chat_id, slot.token))

    try:
        asyncio.run(measure())
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    return result
