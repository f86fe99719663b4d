"""Chat content never reaches the logs: not what a user writes, not what the model says,
not a title, on the good path or the failure paths (a provider that breaks mid-stream or
refuses, a stop, a client that leaves, a database that is gone at settlement, a refused
message). Once as `chatmeter serve --workers 2` configured as an operator would, once
in process with every logger at DEBUG."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatmeter.config import ModelConfig
from tests.conftest import TEST_SECRET, auth, make_settings, scripted
from tests.fakes.openai_server import OpenAIScript, OpenAIServer
from tests.support.outage import DatabaseOutage
from tests.support.process import chatmeter_process
from tests.support.server import serve

USER = "log-watcher"


class Markers:
    """Unique strings, one per kind of content, to look for in the logs."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:12]
        self.message = f"usermarker{tag}"
        self.reply = f"replymarker{tag}"
        self.partial = f"partialmarker{tag}"
        self.title = f"titlemarker{tag}"

    def all(self) -> list[str]:
        return [self.message, self.reply, self.partial, self.title]

    def assert_absent(self, log: str) -> None:
        for marker in self.all():
            assert marker not in log, f"{marker} is in the log:\n{log[-3000:]}"


@pytest.fixture
def fake_openai() -> Iterator[OpenAIServer]:
    server = OpenAIServer().start()
    try:
        yield server
    finally:
        server.stop()


def chat(client: httpx.Client, model: str, markers: Markers) -> str:
    body = {"title": f"About {markers.title}", "model": model}
    response = client.post("/api/chat", json=body, headers=auth(USER))
    assert response.status_code == 201, response.text
    return str(response.json()["chat_id"])


def send(client: httpx.Client, chat_id: str, markers: Markers, *, read_events: int = 0) -> str:
    """Send a message carrying the marker; the whole stream, or only its first events."""
    body = {"message": f"Please repeat {markers.message} back"}
    url = f"/api/chat/{chat_id}/message"
    with client.stream("POST", url, json=body, headers=auth(USER)) as response:
        assert response.status_code == 200
        text = ""
        for count, line in enumerate(response.iter_lines()):
            text += line + "\n"
            if read_events and count >= 2 * read_events:
                break  # leave: the client goes away mid-stream
    return text


def every_path(client: httpx.Client, markers: Markers, openai: OpenAIServer) -> None:
    # the good path
    good = chat(client, "scripted", markers)
    assert '"done":true' in send(client, good, markers)
    # a refused message: too long, and mentioning the marker
    too_long = {"message": markers.message * 1000}
    refused = client.post(f"/api/chat/{good}/message", json=too_long, headers=auth(USER))
    assert refused.status_code == 400
    # a rename
    rename = {"title": f"Now {markers.title}"}
    assert client.patch(f"/api/chat/{good}", json=rename, headers=auth(USER)).status_code == 200
    # a provider that breaks after part of its reply, and one that refuses up front
    broken = chat(client, "openai", markers)
    openai.script = OpenAIScript(pieces=["So ", markers.partial, " and"], drop_after=2)
    assert '"code":"PROVIDER_ERROR"' in send(client, broken, markers)
    openai.script = OpenAIScript(pieces=[markers.partial], error_status=500)
    assert '"error":true' in send(client, broken, markers)
    # a stop, then a client that leaves
    slow = chat(client, "slow", markers)
    url = f"/api/chat/{slow}/message"
    body = {"message": f"Slowly, {markers.message}"}
    with client.stream("POST", url, json=body, headers=auth(USER)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("id:")
        stop = client.post(f"/api/chat/{slow}/stop", headers=auth(USER))
        assert stop.status_code == 202, stop.text
        assert '"finish_reason":"stopped"' in "".join(lines)
    send(client, slow, markers, read_events=1)


def toml_config(markers: Markers, openai: OpenAIServer) -> str:
    return f"""
default_model = "scripted"

[models.scripted]
provider = "scripted"
reply = "Here is {markers.reply}, as asked."
chunks = 3

[models.slow]
provider = "scripted"
reply = "Slow {markers.reply} slow slow slow slow slow slow slow slow"
chunks = 10
delay_ms = 100

[models.openai]
provider = "openai"
model = "gpt-4o-mini"
base_url = "{openai.base_url}"
api_key_env = "HOSTILE_LOGS_OPENAI_KEY"
timeout_seconds = 10
"""


def test_no_content_in_the_logs_of_chatmeter_serve(
    database_url: str, tmp_path: Path, fake_openai: OpenAIServer
) -> None:
    markers = Markers()
    with chatmeter_process(
        database_url,
        TEST_SECRET,
        toml_config(markers, fake_openai),
        tmp_path,
        extra_env={"HOSTILE_LOGS_OPENAI_KEY": "sk-hostile-logs"},
    ) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            every_path(client, markers, fake_openai)
    log = (tmp_path / "server.log").read_text(errors="replace")
    # the log is the server's, and the failure was logged (so not a silent, empty log)
    assert "Started server process" in log or "Uvicorn running" in log, log[-2000:]
    markers.assert_absent(log)


async def test_no_content_in_the_logs_at_debug_level(
    database_url: str,
    tmp_path: Path,
    fake_openai: OpenAIServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    markers = Markers()
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HOSTILE_LOGS_OPENAI_KEY", "sk-hostile-logs")
    models = {
        "scripted": scripted(reply=f"Here is {markers.reply}.", chunks=3),
        "slow": scripted(reply=f"Slow {markers.reply} " * 4, chunks=8, delay_ms=60),
        "openai": ModelConfig(
            provider="openai",
            model="gpt-4o-mini",
            base_url=fake_openai.base_url,
            api_key_env="HOSTILE_LOGS_OPENAI_KEY",
        ),
    }
    async with DatabaseOutage(database_url) as outage:
        settings = make_settings(
            outage.url,
            models=models,
            settle_retry_seconds=0.2,
            sqlite_busy_timeout_ms=50,
            outbox_dir=str(tmp_path / "outbox"),
        )
        async with serve(settings) as running:
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                await debug_paths(client, markers, fake_openai, outage)
    assert any(r.levelno >= logging.WARNING for r in caplog.records), "no failure was logged"
    markers.assert_absent(caplog.text)


async def debug_paths(
    client: httpx.AsyncClient, markers: Markers, openai: OpenAIServer, outage: DatabaseOutage
) -> None:
    async def new_chat(model: str) -> str:
        body = {"title": markers.title, "model": model}
        response = await client.post("/api/chat", json=body, headers=auth(USER))
        assert response.status_code == 201, response.text
        return str(response.json()["chat_id"])

    body = {"message": f"Please repeat {markers.message}"}
    # the good path, through the real OpenAI SDK too, then that provider breaking
    for model in ("scripted", "openai"):
        url = f"/api/chat/{await new_chat(model)}/message"
        openai.script = OpenAIScript(pieces=["So ", markers.partial, " and"])
        assert (await client.post(url, json=body, headers=auth(USER))).status_code == 200
    openai.script = OpenAIScript(pieces=["So ", markers.partial, " and"], drop_after=2)
    broken = await client.post(url, json=body, headers=auth(USER))
    assert '"code":"PROVIDER_ERROR"' in broken.text
    # the database is gone when a reply is settled
    url = f"/api/chat/{await new_chat('slow')}/message"
    began = False
    async with client.stream("POST", url, json=body, headers=auth(USER)) as response:
        text = ""
        async for line in response.aiter_lines():
            text += line
            if text.count("data:") == 2 and not began:
                outage.begin()
                began = True
    outage.end()
    assert '"code":"DATABASE_ERROR"' in text, text
