"""`chatmeter chat` run as a person runs it: a real process reading typed lines, talking
to a real chatmeter server, interrupted with a real SIGINT."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from chatmeter.cli.chat import ApiProblem, ChatApi, ChatSession, ReplyReading
from chatmeter.config import ModelConfig, PlanConfig
from chatmeter.streaming.stopping import flag_stop
from tests.conftest import TEST_SECRET, auth, make_settings, scripted, token_for
from tests.support.proxy import CuttingProxy, cutting_proxy
from tests.support.server import RunningServer, serve
from tests.support.sse import stream_message
from tests.support.waiting import eventually

STORY = "Once upon a time, a careful meter counted every token the model spoke."
# slow enough that a stop lands long before the end however busy the machine: a reply
# takes 40 s (400 pieces, 100 ms apart); the tests stop it
SLOW_WORDS = 400
SLOW = " ".join(f"word{n}" for n in range(1, SLOW_WORDS + 1))
PROMPT = "you \u203a"
WAIT = 30.0  # generous: CI machines are busy, and a wait ends when its text comes


class Terminal:
    """A `chatmeter chat` process: lines go to its stdin, its output is collected."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = ""
        self._seen = 0

    async def expect(self, pattern: str, start: int | None = None) -> re.Match[str]:
        """Wait until `pattern` (a regex) shows up in output not yet matched (or
        after `start`)."""
        regex = re.compile(pattern)
        stdout = self.process.stdout
        assert stdout is not None

        async def wait() -> re.Match[str]:
            while True:
                match = regex.search(self.output, self._seen if start is None else start)
                if match:
                    self._seen = match.end()
                    return match
                piece = await stdout.read(4096)
                if not piece:
                    raise AssertionError(f"the client ended before {pattern!r}:\n{self.output}")
                self.output += piece.decode()

        try:
            return await asyncio.wait_for(wait(), WAIT)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} in the client's output:\n{self.output}") from None

    async def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def close_stdin(self) -> int:
        """Ctrl-D: end of input. Returns the exit status."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.stdout is not None
        rest = await asyncio.wait_for(self.process.stdout.read(), WAIT)
        self.output += rest.decode()
        return await asyncio.wait_for(self.process.wait(), WAIT)


ServerFactory = Callable[..., AbstractAsyncContextManager[RunningServer]]


@pytest.fixture
def chatmeter(sqlite_url: str) -> ServerFactory:
    def start(model: ModelConfig, **overrides: Any) -> AbstractAsyncContextManager[RunningServer]:
        models = {"main": model, **overrides.pop("models", {})}
        return serve(make_settings(sqlite_url, default_model="main", models=models, **overrides))

    return start


@pytest.fixture
async def terminal(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts `chatmeter chat` processes; kills any still running at the end."""
    started: list[asyncio.subprocess.Process] = []

    async def run(*args: str, env: dict[str, str] | None = None) -> Terminal:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CHATMETER_")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatmeter",
            "chat",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**clean, "COLUMNS": "200", **(env or {})},
        )
        started.append(process)
        return Terminal(process)

    yield run
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def get(server: RunningServer, path: str, user: str) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.get(path, headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()


async def reply_started(server: RunningServer, chat_id: str, user: str) -> None:
    """The reply to "From another window" streams: its opening saved that message."""

    async def started() -> bool:
        chat = await get(server, f"/api/chat/{chat_id}", user)
        return any(m["content"] == "From another window" for m in chat["messages"])

    await eventually(started, within=WAIT)


async def only_chat(server: RunningServer, user: str) -> dict[str, Any]:
    chats = (await get(server, "/api/chat", user))["chats"]
    assert len(chats) == 1, chats
    chat: dict[str, Any] = await get(server, f"/api/chat/{chats[0]['chat_id']}", user)
    return chat


async def test_a_reply_streams_in_with_the_tokens_it_used(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    # idle pings (`: ping` comments) arrive between the pieces: the client skips them
    story = scripted(reply=STORY, chunks=10, delay_ms=100)
    async with chatmeter(story, ping_interval_seconds=0.03) as server:
        term: Terminal = await terminal("--url", server.url, "--token", token_for("lena"))
        await term.expect(r"signed in as lena · 100,000 of 100,000 tokens left")
        await term.expect(PROMPT)
        await term.type("Tell me a story")
        first = await term.expect(r"model \u203a Once upon")
        # streamed: the first pieces are shown while the rest is still on its way
        assert STORY not in term.output
        await term.expect(re.escape(STORY), start=first.start())
        used = await term.expect(r"\n([\d,]+) tokens · ([\d,]+) of 100,000 tokens left")
        usage = await get(server, "/api/usage", "lena")
        assert int(used[1].replace(",", "")) == usage["total_tokens_used"] > 0
        assert int(used[2].replace(",", "")) == usage["tokens_remaining"]
        await term.expect(PROMPT)
        assert await term.close_stdin() == 0

        chat = await only_chat(server, "lena")
        saved = [(m["role"], m["content"], m["status"]) for m in chat["messages"]]
        assert saved == [
            ("user", "Tell me a story", "complete"),
            ("assistant", STORY, "complete"),
        ]


async def test_ctrl_c_stops_the_reply_and_the_session_goes_on(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=SLOW, chunks=SLOW_WORDS, delay_ms=100)) as server:
        term: Terminal = await terminal("--url", server.url, "--token", token_for("milo"))
        await term.expect(PROMPT)
        await term.type("Count slowly")
        await term.expect(r"word2 ")
        term.process.send_signal(signal.SIGINT)
        stopped = await term.expect(r"stopped · ([\d,]+) tokens")
        await term.expect(PROMPT)
        assert term.process.returncode is None  # still running

        chat = await only_chat(server, "milo")
        reply = chat["messages"][-1]
        assert reply["role"] == "assistant" and reply["status"] == "stopped"
        assert SLOW.startswith(reply["content"]) and len(reply["content"]) < len(SLOW)
        assert reply["content"] in term.output
        assert int(stopped[1].replace(",", "")) == reply["tokens_consumed"]

        # the session accepts another message, and Ctrl-C stops that one too
        await term.type("Again")
        await term.expect(r"model \u203a word1")
        term.process.send_signal(signal.SIGINT)
        await term.expect(r"stopped · ")
        await term.expect(PROMPT)
        assert await term.close_stdin() == 0
        chat = await only_chat(server, "milo")
        assert [m["status"] for m in chat["messages"]] == ["complete", "stopped"] * 2
        assert [m["content"] for m in chat["messages"]][::2] == ["Count slowly", "Again"]


async def test_ctrl_c_as_the_message_goes_out_stops_the_reply_once_it_opens(
    chatmeter: ServerFactory, terminal: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C right after Enter: the stop reaches the server before the message's opening
    has committed, and is answered that no reply is live (404). The client stops the
    reply as soon as its first event says it opened, instead of letting it run."""
    async with chatmeter(scripted(reply=SLOW, chunks=SLOW_WORDS, delay_ms=100)) as server:
        transactor = server.services.transactor
        opening, release, stop_answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
        open_together, run = transactor.run_together, transactor.run

        async def held_opening(*args: Any, **kwargs: Any) -> Any:
            opening.set()
            await release.wait()
            return await open_together(*args, **kwargs)

        async def noting_stops(steps: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await run(steps, *args, **kwargs)
            finally:
                if steps is flag_stop:
                    stop_answered.set()

        monkeypatch.setattr(transactor, "run_together", held_opening)
        monkeypatch.setattr(transactor, "run", noting_stops)
        term: Terminal = await terminal("--url", server.url, "--token", token_for("nia"))
        await term.expect(PROMPT)
        await term.type("Count slowly")
        await asyncio.wait_for(opening.wait(), WAIT)
        term.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(stop_answered.wait(), WAIT)  # no live reply yet: 404
        release.set()
        await term.expect(r"stopped · ")
        await term.expect(PROMPT)
        chat = await only_chat(server, "nia")
        assert [m["status"] for m in chat["messages"]] == ["complete", "stopped"]
        assert "There was no reply to stop" not in term.output


async def count_through_one_cut(term: Terminal, proxy: CuttingProxy) -> Any:
    """Ask for the slow reply through a proxy that cuts the connection once: the client
    shows it whole; returns its match (the reply, the tokens). Ends the session."""
    await term.type("Count")
    shown = await term.expect(r"model \u203a (.*)\n([\d,]+) tokens · ")
    assert proxy.cuts == 1
    assert shown[1] == SLOW
    await term.expect(PROMPT)
    assert await term.close_stdin() == 0
    return shown


async def test_a_dropped_connection_is_resumed_and_the_reply_shown_once(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    """The network fails mid-reply: the client resumes the reply where it broke (SPEC
    section 11) and shows it whole, once; the server billed it once."""
    async with chatmeter(scripted(reply=SLOW, chunks=40, delay_ms=30)) as server:
        async with cutting_proxy(server.url, events=6) as proxy:
            term: Terminal = await terminal("--url", proxy.url, "--token", token_for("nia"))
            await term.expect(PROMPT)
            shown = await count_through_one_cut(term, proxy)
        chat = await only_chat(server, "nia")
        reply = chat["messages"][-1]
        assert reply["status"] == "complete" and reply["content"] == SLOW
        usage = await get(server, "/api/usage", "nia")
        assert (
            usage["total_tokens_used"] == reply["tokens_consumed"] == int(shown[2].replace(",", ""))
        )


async def test_a_connection_dropped_before_the_reply_was_named_is_resumed_too(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    """The network fails before the first event (the one naming the reply) arrives:
    the reply goes on on the server all the same, so the client resumes the chat's
    current reply (SPEC section 11) rather than give up on it; the reply before it, still
    resumable, is not taken for it."""
    async with chatmeter(scripted(reply=SLOW, chunks=40, delay_ms=30)) as server:
        async with cutting_proxy(server.url, events=0, request_marker=b"Count") as proxy:
            term: Terminal = await terminal("--url", proxy.url, "--token", token_for("ora"))
            await term.expect(PROMPT)
            await term.type("First")
            await term.expect(r"model \u203a (.*)\n([\d,]+) tokens · ")
            await term.expect(PROMPT)
            shown = await count_through_one_cut(term, proxy)
        chat = await only_chat(server, "ora")
        assert [m["status"] for m in chat["messages"]] == ["complete"] * 4
        reply = chat["messages"][-1]
        assert (
            reply["content"] == SLOW and int(shown[2].replace(",", "")) == reply["tokens_consumed"]
        )
        usage = await get(server, "/api/usage", "ora")
        assert usage["total_tokens_used"] == sum(m["tokens_consumed"] for m in chat["messages"])


def test_a_resume_before_the_reply_was_named_does_not_take_the_reply_before_it() -> None:
    # the chat's current reply is still the one before this message (the message has
    # not opened its own yet): it is not shown, and the next resume starts from the first
    # event again
    shown = io.StringIO()
    console = Console(file=shown, highlight=False)
    session = ChatSession(ChatApi(httpx.Client()), console, None)
    reading = ReplyReading(previous="old-reply")
    old = ["id: 1", 'data: {"chunk": "", "done": false, "message_id": "old-reply"}', ""]
    assert (
        session._print([*old, "id: 2", 'data: {"chunk": "stale", "done": false}', ""], reading)
        is None
    )
    assert (reading.reply_id, reading.last_id) == ("", 0)
    new = ["id: 1", 'data: {"chunk": "", "done": false, "message_id": "new-reply"}', ""]
    end = ["id: 2", 'data: {"chunk": "", "done": true, "tokens_used": 3}', ""]
    assert session._print([*new, *end], reading) == {"chunk": "", "done": True, "tokens_used": 3}
    assert (reading.reply_id, reading.last_id, session.last_reply_id) == (
        "new-reply",
        2,
        "new-reply",
    )
    assert "stale" not in shown.getvalue()


def test_no_reply_to_resume_yet_is_not_the_end_of_an_unnamed_reply() -> None:
    # 204 to a resume: a named reply is gone for good; an unnamed one may not have been
    # opened yet by its message, so the client tries again after the next pause
    asked: list[httpx.Request] = []

    def none_to_resume(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(204)

    http = httpx.Client(
        base_url="http://chatmeter.test", transport=httpx.MockTransport(none_to_resume)
    )
    session = ChatSession(ChatApi(http), Console(file=io.StringIO()), None)
    session.chat_id = "c1"
    assert session._resume(ReplyReading(previous="old-reply")) is None
    assert "message_id" not in asked[-1].url.params
    with pytest.raises(ApiProblem) as gone:
        session._resume(ReplyReading(reply_id="r1", last_id=4))
    assert gone.value.code == "REPLY_GONE"
    assert (asked[-1].url.params["message_id"], asked[-1].headers["last-event-id"]) == ("r1", "4")


def test_a_resume_answered_by_a_server_in_trouble_is_tried_again() -> None:
    # a worker restarting behind a load balancer: the resume meets a 502 or a 503 where
    # the reply goes on elsewhere; the client tries again after the next pause (SPEC
    # section 11). A refusal (403, 404) is told as before
    answers = [
        httpx.Response(502, text="Bad Gateway"),
        httpx.Response(503, json={"error": True, "code": "DATABASE_UNAVAILABLE", "message": "x"}),
        httpx.Response(403, json={"error": True, "code": "FORBIDDEN", "message": "not yours"}),
    ]
    http = httpx.Client(
        base_url="http://chatmeter.test", transport=httpx.MockTransport(lambda _: answers.pop(0))
    )
    session = ChatSession(ChatApi(http), Console(file=io.StringIO()), None)
    session.chat_id = "c1"
    reading = ReplyReading(reply_id="r1", last_id=3)
    assert session._resume(reading) is None
    assert session._resume(reading) is None
    with pytest.raises(ApiProblem) as refused:
        session._resume(reading)
    assert refused.value.code == "FORBIDDEN"


async def test_a_plan_without_a_token_limit_shows_its_spend(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    """A plan may limit money only (SPEC section 10: `token_limit` null in the usage):
    the client says so and shows the spend, where it read the token limit as a number."""
    plans = {"pro": PlanConfig(spend_limit=Decimal("20"), period="month")}
    async with chatmeter(scripted(reply=STORY, chunks=5), plans=plans) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assigned = await http.put(
                "/api/admin/users/pia/plan", json={"plan": "pro"}, headers=auth("ad", admin=True)
            )
            assert assigned.status_code == 200, assigned.text
        term: Terminal = await terminal("--url", server.url, "--token", token_for("pia"))
        await term.expect(r"signed in as pia · no token limit · 0 of 20 USD spent")
        await term.expect(PROMPT)
        await term.type("Tell me")
        await term.expect(r"[\d,]+ tokens · no token limit · 0 of 20 USD spent")
        await term.expect(PROMPT)
        assert await term.close_stdin() == 0


async def test_without_a_token_it_is_the_dev_user_and_continues_a_chat(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    other = scripted(reply="From the other model.", chunks=2)
    async with chatmeter(scripted(reply=STORY, chunks=3), models={"other": other}) as server:
        # the development secret `make run` uses (here the configured one)
        env = {"CHATMETER_JWT_SECRET": TEST_SECRET}
        term: Terminal = await terminal("--url", server.url, "--model", "other", env=env)
        await term.expect(r"signed in as dev-user")
        await term.expect(r"New chat [0-9a-f-]{36} \(model other\)")
        await term.type("Hi")
        await term.expect(r"From the other model\.")
        await term.expect(PROMPT)
        assert await term.close_stdin() == 0
        chat = await only_chat(server, "dev-user")
        assert chat["model"] == "other"

        # --chat continues it: the history is shown and the next message joins it
        resumed: Terminal = await terminal("--url", server.url, "--chat", chat["chat_id"], env=env)
        await resumed.expect(r"2 messages")
        await resumed.expect(r"model \u203a From the other model\.")
        await resumed.expect(PROMPT)
        await resumed.type("And again")
        await resumed.expect(r"From the other model\.\n")
        await resumed.expect(PROMPT)
        assert await resumed.close_stdin() == 0
        chat = await only_chat(server, "dev-user")
        assert [m["content"] for m in chat["messages"]][2:] == [
            "And again",
            "From the other model.",
        ]


async def test_errors_are_told_in_words(
    chatmeter: ServerFactory, terminal: Callable[..., Any]
) -> None:
    async with chatmeter(scripted(reply=SLOW, chunks=SLOW_WORDS, delay_ms=100)) as server:
        nobody = "http://127.0.0.1:9"  # the discard port: nothing listens there
        unreachable: Terminal = await terminal("--url", nobody, "--token", token_for("nia"))
        await unreachable.expect(r"Cannot reach chatmeter at http://127\.0\.0\.1:9")
        assert await unreachable.close_stdin() == 1

        refused: Terminal = await terminal("--url", server.url, "--token", "not-a-token")
        await refused.expect(r"The server did not accept the token")
        assert await refused.close_stdin() == 1
        assert "UNAUTHORIZED" not in refused.output and "{" not in refused.output

        missing: Terminal = await terminal(
            "--url",
            server.url,
            "--token",
            token_for("nia"),
            "--chat",
            "0" * 8 + "-0000-4000-8000-" + "0" * 12,
        )
        await missing.expect(r"This chat does not exist any more")
        assert await missing.close_stdin() == 1

        # a reply already being written in the chat (by another window)
        term: Terminal = await terminal("--url", server.url, "--token", token_for("nia"))
        await term.expect(PROMPT)
        chat_id = (await get(server, "/api/chat", "nia"))["chats"][0]["chat_id"]
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            elsewhere = asyncio.create_task(
                stream_message(http, chat_id, "From another window", token_for("nia"))
            )
            await reply_started(server, chat_id, "nia")
            await term.type("Me too")
            await term.expect(r"A reply is still being written in this chat")
            await term.expect(PROMPT)
            stopped = await http.post(f"/api/chat/{chat_id}/stop", headers=auth("nia"))
            assert stopped.status_code == 202
            assert (await elsewhere).last["finish_reason"] == "stopped"

        # a spent budget: refused in words, and the session goes on
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            limited = await http.put(
                "/api/admin/users/nia/limit",
                json={"token_limit": 1},
                headers=auth("root", admin=True),
            )
        assert limited.status_code == 200, limited.text
        await term.type("Hello?")
        await term.expect(r"Your token budget is spent")
        await term.expect(PROMPT)
        assert await term.close_stdin() == 0
        assert "TOKEN_BUDGET_EXCEEDED" not in term.output and "REPLY_IN_PROGRESS" not in term.output
