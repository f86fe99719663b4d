"""The HTTP/1.1 connection: uvicorn's httptools protocol with the bounds SPEC §4 asks for.

httptools has no limit of its own: a request head of 100 MB is buffered whole (the
parser concatenates partial header values), and a client that sends a byte a second
holds its connection forever (uvicorn's keep-alive timer is cancelled by any byte).
Here, at the layer that sees the bytes before they are parsed:

- the head of each request (request line and headers) may be at most 64 KiB; past it the
  client gets 431 and the connection is closed, before more is read;
- each request (head and body) must arrive within `request_read_timeout_seconds` of the
  connection being ready for it (opened, or the previous response finished); a client
  still sending then is answered 408 and cut off. Other connections are not affected:
  each is an independent protocol on the event loop.

What the parser refuses (an unknown method, a bad Content-Length, a malformed request
line) is answered in the contract's JSON error shape instead of uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from chatmeter.config import Settings
from chatmeter.jsonutil import dumps

MAX_HEAD_BYTES = 64 * 1024
# after a refusal, what the client was still sending is read and dropped for a moment, so
# that it reads the answer instead of a reset; never more than this, never for longer
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0


class ChatmeterProtocol(HttpToolsProtocol):
    """One client connection. Build it through `http_protocol(settings)`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        read_timeout: float = 20.0,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.read_timeout = read_timeout
        self.max_head_bytes = max_head_bytes
        self.reading_head = True  # the bytes coming are a request head
        self.head_bytes = 0  # of the head being read
        self.request_started = False  # a byte of the current request has come
        # when the request being read must be in; None while none is being read
        self.read_deadline: float | None = None
        self.read_timer: asyncio.TimerHandle | None = None
        self.refused = False  # answered with an error: the rest is dropped, then closed
        self.dropped_bytes = 0
        self.linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            self.dropped_bytes += len(data)
            if self.dropped_bytes > LINGER_BYTES:
                self.transport.close()
            return
        if not self.reading_head:
            super().data_received(data)
            return
        self.request_started = True
        room = self.max_head_bytes - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            super().data_received(data)
            return
        # only what fits is parsed: the head must end inside it
        self.head_bytes = self.max_head_bytes
        super().data_received(data[:room])
        if self.refused or self.transport.is_closing():
            return
        if self.reading_head:
            self._refuse(
                431,
                "HEADERS_TOO_LARGE",
                f"The request line and headers are over {self.max_head_bytes} bytes.",
            )
            return
        self.data_received(data[room:])

    def on_headers_complete(self) -> None:
        self.reading_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.read_deadline = None
        # what comes next is the head of the next request
        self.reading_head = True
        self.head_bytes = 0
        self.request_started = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # armed only when nothing is in progress: a pipelined request may be answered now
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.reading_head and not self.transport.is_closing():
            self._start_reading()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "INVALID_REQUEST", "The request is not valid HTTP/1.1.")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in the error shape and close, parsing nothing more."""
        self.read_deadline = None
        self.refused = True
        body = dumps({"error": True, "code": code, "message": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.transport.can_write_eof():
            # the answer, then end of stream; closing now, with the client's bytes unread,
            # would reset the connection and the client could lose the answer
            self.transport.write_eof()
            self.linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _start_reading(self) -> None:
        """The connection waits for a request: it must be in within the timeout. One timer
        per connection, moved on lazily: arming and cancelling one per request would cost
        more than the rest of this class."""
        self.read_deadline = self.loop.time() + self.read_timeout
        if self.read_timer is None:
            self.read_timer = self.loop.call_later(self.read_timeout, self._on_read_timer)

    def _on_read_timer(self) -> None:
        self.read_timer = None
        if self.read_deadline is None or self.transport.is_closing():
            return  # nothing is being read: the next request arms it again
        left = self.read_deadline - self.loop.time()
        if left > 0:
            self.read_timer = self.loop.call_later(left, self._on_read_timer)
            return
        if self.request_started and self.reading_head:
            self._refuse(
                408, "REQUEST_TIMEOUT", f"The request did not arrive within {self.read_timeout} s."
            )
        else:
            # an idle connection, or a body still coming while the app reads it: the app
            # sees the client leave
            self.transport.close()


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """What `uvicorn.Config(http=…)` takes. A partial rather than a class made at run time:
    `--workers N` pickles it to each worker process."""
    factory = partial(ChatmeterProtocol, read_timeout=settings.request_read_timeout_seconds)
    # uvicorn only calls it with the protocol's keyword arguments
    return cast("type[asyncio.Protocol]", factory)
