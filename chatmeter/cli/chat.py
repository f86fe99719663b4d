"""`chatmeter chat`: a terminal client of the streaming API.

A prompt loop: each message is sent to POST /api/chat/{id}/message and the reply is
printed piece by piece as it arrives, then the tokens it used and the budget left.
Ctrl-C during a reply asks the server to stop it (the stream then ends normally with
finish_reason "stopped"); a second Ctrl-C leaves the reply at once. Ctrl-C or Ctrl-D at
the prompt leaves the session.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from chatmeter.auth.tokens import mint_token
from chatmeter.config import ConfigError, dev_jwt_secret, load_settings
from chatmeter.metering.cost import money

DEV_USER = "dev-user"
ARROW = "\u203a"  # a single right-pointing angle quotation mark
TIMEOUT = httpx.Timeout(10.0, read=60.0)  # the server pings an idle stream every 15 s

WORDS = {
    "UNAUTHORIZED": "The server did not accept the token: it has expired or is not valid "
    "there. Mint a new one with `chatmeter token --user NAME`.",
    "INVALID_CHAT_ID": "That is not a chat id (chat ids are UUIDs).",
    "CHAT_NOT_FOUND": "This chat does not exist any more (it may have been deleted). "
    "Type /new to start another.",
    "FORBIDDEN": "This chat belongs to another user.",
    "TOKEN_BUDGET_EXCEEDED": "Your token budget is spent: too little is left for this "
    "message and its reply. An admin can raise it with `chatmeter users set-limit`.",
    "REPLY_IN_PROGRESS": "A reply is still being written in this chat (in another window?). "
    "Wait for it to finish, then send again.",
    "NO_ACTIVE_REPLY": "There was no reply to stop.",
    "REPLY_GONE": "The connection dropped and the reply can no longer be resumed; "
    "what was written is in the chat (/new, or --chat ID, to see it).",
    "PROVIDER_ERROR": "The model failed while answering. Try again.",
    "PROVIDER_RATE_LIMITED": "The model is busy right now. Try again in a moment.",
    "PROVIDER_TIMEOUT": "The model stopped responding. Try again.",
    "CONTENT_BLOCKED": "The model declined to answer this message.",
    "DATABASE_ERROR": "The reply could not be saved yet; it will be recorded shortly.",
    "INTERNAL_ERROR": "Something went wrong on the server. Try again.",
}

# terminal control characters in model output (escape sequences could rewrite the
# screen or the title); newlines and tabs stay
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

HELP = (
    "Type a message and press Enter. Ctrl-C stops a reply; Ctrl-D, Ctrl-C or /quit leaves.\n"
    "/new starts another chat, /usage shows the budget, /help shows this."
)


def terminal_safe(text: str) -> str:
    return _CONTROL.sub("", text)


def describe(code: str, message: str) -> str:
    """An error code in words; the server's own message where it names a detail."""
    if code == "INVALID_MESSAGE":
        return f"That message cannot be sent ({message})."
    if code == "INVALID_REQUEST":
        return f"The server did not accept that: {message}"
    return WORDS.get(code, message or f"The server answered with an error ({code}).")


class ApiProblem(Exception):
    """A refusal or failure, already in words for the person at the terminal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(describe(code, message))
        self.code = code


def read_events(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The id and JSON data of each server-sent event; `: ping` comments are skipped."""
    data: list[str] = []
    event_id = 0
    for line in lines:
        if not line:
            if data:
                event = json.loads("\n".join(data))
                data = []
                if isinstance(event, dict):
                    yield event_id, event
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id" and value.isdigit():
            event_id = int(value)


def _problem(response: httpx.Response) -> ApiProblem:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return ApiProblem(body["code"], str(body.get("message", "")))
    if response.status_code == 401:
        return ApiProblem("UNAUTHORIZED", "")
    return ApiProblem(f"HTTP {response.status_code}", "")


class ChatApi:
    """The calls the client makes; every refusal raises ApiProblem."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, path, json=body)
        if response.is_error:
            raise _problem(response)
        return response.json()

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = self._json("GET", "/api/usage")
        return usage

    def create_chat(self, model: str | None) -> dict[str, Any]:
        chat: dict[str, Any] = self._json("POST", "/api/chat", {"model": model} if model else {})
        return chat

    def get_chat(self, chat_id: str) -> dict[str, Any]:
        chat: dict[str, Any] = self._json("GET", f"/api/chat/{chat_id}")
        return chat


@dataclass
class ReplyReading:
    """Where the client is in a reply: enough to resume it after a dropped connection.
    Until the first event names the reply, a resume asks for the chat's current reply,
    and `previous` (the reply before this message) is not taken for it."""

    previous: str = ""
    reply_id: str = ""
    last_id: int = 0
    # set when the first event names the reply (the server has opened it), or when the
    # reading is over: a stop asked for before then waits for it (`StopRequest`)
    opened: threading.Event = field(default_factory=threading.Event)


# pauses before each attempt to resume a reply whose connection dropped
RESUME_PAUSES = (0.2, 0.5, 1.0, 2.0, 4.0)


@dataclass
class StopRequest:
    """Ctrl-C during a reply: the stop call runs on a thread of its own (with a client
    of its own) while the main thread keeps reading the stream until the end event."""

    base_url: str
    headers: dict[str, str]
    chat_id: str
    reading: ReplyReading
    sent: bool = False
    over: bool = False  # the reading ended
    problem: str | None = None

    def send(self) -> None:
        if self._post() and not self.over:
            # Ctrl-C as the message went out, before the server had opened its reply (or
            # as it did): stop the reply once its first event says it is open
            self.reading.opened.wait()
            if not self.over:
                self._post()

    def _post(self) -> bool:
        """POST the stop; True if the server had no reply to stop."""
        try:
            with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=10) as http:
                response = http.post(f"/api/chat/{self.chat_id}/stop")
        except httpx.HTTPError:
            self.problem = "The stop request did not reach the server."
            return False
        if response.is_error:
            problem = _problem(response)
            if problem.code == "NO_ACTIVE_REPLY":  # not open yet, or it had just finished
                return True
            self.problem = str(problem)
        return False


class ChatSession:
    def __init__(self, api: ChatApi, console: Console, model: str | None) -> None:
        self.api = api
        self.console = console
        self.model = model
        self.chat_id = ""
        self.last_reply_id = ""  # the chat's latest reply: not the one a new message starts

    # ------------------------------------------------------------- start

    def start_chat(self) -> None:
        chat = self.api.create_chat(self.model)
        self.chat_id = chat["chat_id"]
        self.last_reply_id = ""
        self.console.print(
            f"[dim]New chat {escape(self.chat_id)} (model {escape(chat['model'])}).[/dim]"
        )

    def resume_chat(self, chat_id: str) -> None:
        chat = self.api.get_chat(chat_id)
        self.chat_id = chat["chat_id"]
        messages = chat["messages"]
        replies = [m["message_id"] for m in messages if m["role"] == "assistant"]
        self.last_reply_id = replies[-1] if replies else ""
        self.console.print(
            f"[dim]Chat “{escape(terminal_safe(chat['title']))}” (model "
            f"{escape(chat['model'])}), {len(messages)} "
            f"message{'' if len(messages) == 1 else 's'}.[/dim]"
        )
        for message in messages[-6:]:
            who = "you" if message["role"] == "user" else "model"
            content = escape(terminal_safe(message["content"]))
            self.console.print(f"[dim]{who} {ARROW} {content}[/dim]")

    def show_usage(self) -> None:
        usage = self.api.usage()
        self.console.print(f"[dim]{_budget(usage)}.[/dim]")

    # ------------------------------------------------------------- the loop

    def run(self) -> None:
        while True:
            try:
                text = self.console.input(f"[bold cyan]you {ARROW}[/bold cyan] ")
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            command = text.strip()
            if not command:
                continue
            try:
                if command in ("/quit", "/exit"):
                    return
                if command == "/help":
                    self.console.print(HELP)
                elif command == "/new":
                    self.start_chat()
                elif command == "/usage":
                    self.show_usage()
                else:
                    self.send(text)
            except ApiProblem as problem:
                self.console.print(f"[red]{escape(str(problem))}[/red]")
                if problem.code == "UNAUTHORIZED":
                    raise typer.Exit(1) from None
            except httpx.TransportError:
                self.console.print("[red]The server cannot be reached. Is it still running?[/red]")

    def send(self, text: str) -> None:
        http = self.api.http
        reading = ReplyReading(previous=self.last_reply_id)
        stop = StopRequest(str(http.base_url), dict(http.headers), self.chat_id, reading)
        stopper = threading.Thread(target=stop.send, daemon=True)

        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            if stop.sent:
                raise KeyboardInterrupt  # a second Ctrl-C: leave now; what was written is kept
            stop.sent = True
            stopper.start()

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            end = self._stream(text, reading)
        except KeyboardInterrupt:
            self.console.print("\n[yellow]Left the reply; what arrived is saved.[/yellow]")
            return
        except httpx.ConnectError:
            raise  # nothing was sent
        except httpx.TransportError:
            self.console.print(
                "\n[red]The connection closed before the reply finished; "
                "what arrived is saved.[/red]"
            )
            return
        finally:
            signal.signal(signal.SIGINT, previous)
            stop.over = True
            reading.opened.set()  # a stop waiting for the reply to open waits no more
        if stop.sent:
            stopper.join(timeout=10)
        if stop.problem:
            self.console.print(f"[red]{escape(stop.problem)}[/red]")
        self._report(end)

    def _stream(self, text: str, reading: ReplyReading) -> dict[str, Any]:
        """Print the reply as it streams; return the end or error event. A connection
        that drops mid-reply is resumed where it broke (SPEC section 11): the reply goes
        on on the server meanwhile."""
        try:
            end = self._post(text, reading)
        except httpx.ConnectError:
            raise  # nothing was sent
        except httpx.TransportError:
            end = None  # dropped, even before the answer's head: the reply goes on
        for pause in RESUME_PAUSES:
            if end is not None:
                break
            time.sleep(pause)
            try:
                end = self._resume(reading)
            except httpx.TransportError:
                continue
        if end is not None:
            return end
        self.console.out("")
        raise httpx.RemoteProtocolError("the stream ended without an end event")

    def _post(self, text: str, reading: ReplyReading) -> dict[str, Any] | None:
        path = f"/api/chat/{self.chat_id}/message"
        with self.api.http.stream("POST", path, json={"message": text}) as response:
            if response.is_error:
                response.read()
                raise _problem(response)
            return self._print(response.iter_lines(), reading)

    def _resume(self, reading: ReplyReading) -> dict[str, Any] | None:
        path = f"/api/chat/{self.chat_id}/stream"
        # unnamed (the connection dropped before the first event): the chat's current reply
        params = {"message_id": reading.reply_id} if reading.reply_id else {}
        headers = {"Last-Event-ID": str(reading.last_id)}
        with self.api.http.stream("GET", path, params=params, headers=headers) as response:
            if response.status_code == 204:
                if not reading.reply_id:
                    return None  # the message may not have opened its reply yet
                raise ApiProblem("REPLY_GONE", "")
            if response.is_server_error:
                return None  # a worker restarting, a database away: the reply goes on
            if response.is_error:
                response.read()
                raise _problem(response)
            return self._print(response.iter_lines(), reading)

    def _print(self, lines: Iterable[str], reading: ReplyReading) -> dict[str, Any] | None:
        """Print pieces until the end or error event (returned); None if the stream
        ended before it."""
        for event_id, event in read_events(lines):
            if not reading.reply_id and event.get("message_id") == reading.previous:
                return None  # the chat's reply before ours: ours has not started yet
            reading.last_id = event_id or reading.last_id
            if event.get("error") or event.get("done"):
                self.console.out("")  # end the reply's line
                return event
            if "message_id" in event:
                reading.reply_id = str(event["message_id"])  # the first event names it
                self.last_reply_id = reading.reply_id
                reading.opened.set()
                self.console.print(f"[bold green]model {ARROW}[/bold green] ", end="")
                continue
            self.console.out(terminal_safe(str(event.get("chunk", ""))), end="")
        return None

    def _report(self, end: dict[str, Any]) -> None:
        used = int(end.get("tokens_used") or 0)
        if end.get("error"):
            code = str(end.get("code", "INTERNAL_ERROR"))
            self.console.print(f"[red]{escape(describe(code, str(end.get('message', ''))))}[/red]")
        try:
            budget = _budget(self.api.usage())
        except (ApiProblem, httpx.HTTPError):
            budget = "budget unknown"
        stopped = "[yellow]stopped[/yellow] · " if end.get("finish_reason") == "stopped" else ""
        self.console.print(f"{stopped}[dim]{used:,} tokens · {budget}[/dim]")


def _budget(usage: dict[str, Any]) -> str:
    """The budget left; a plan may have no token limit, and a spend limit (SPEC 10)."""
    if usage["token_limit"] is None:
        told = "no token limit"
    else:
        left = max(int(usage["tokens_remaining"]), 0)
        told = f"{left:,} of {int(usage['token_limit']):,} tokens left"
    if usage.get("spend_limit_micros") is not None:
        spent, limit = money(int(usage["spend_micros"])), money(int(usage["spend_limit_micros"]))
        told += f" · {spent} of {limit} {usage['currency']} spent"
    return told


def _dev_token(console: Console) -> str:
    """A token for the development user, minted with the secret `make run` uses."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    return mint_token(
        dev_jwt_secret(settings),
        DEV_USER,
        ttl_seconds=86400,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )


def chat_command(
    url: Annotated[str, typer.Option(help="Address of the chatmeter server.")] = (
        "http://127.0.0.1:8000"
    ),
    token: Annotated[
        str | None,
        typer.Option(help="Access token. Default: one for dev-user, from the development secret."),
    ] = None,
    chat: Annotated[
        str | None, typer.Option("--chat", help="Continue this chat instead of a new one.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model of new chats (default: the server's).")
    ] = None,
) -> None:
    """Chat with a model in the terminal: replies stream in, with the tokens they used."""
    console = Console(highlight=False)
    bearer = token or _dev_token(console)
    headers = {"Authorization": f"Bearer {bearer}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT) as http:
        session = ChatSession(ChatApi(http), console, model)
        try:
            usage = session.api.usage()
            console.print(
                f"[bold]chatmeter[/bold] at {escape(url)} · signed in as "
                f"[bold]{escape(str(usage['user_id']))}[/bold] · {_budget(usage)}"
            )
            if chat:
                session.resume_chat(chat)
            else:
                session.start_chat()
        except ApiProblem as problem:
            console.print(f"[red]{escape(str(problem))}[/red]")
            raise typer.Exit(1) from None
        except httpx.TransportError:
            console.print(
                f"[red]Cannot reach chatmeter at {escape(url)}. Is the server running? "
                "(`make run` starts one.)[/red]"
            )
            raise typer.Exit(1) from None
        console.print(f"[dim]{HELP}[/dim]")
        session.run()
