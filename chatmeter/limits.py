"""Request bodies over the configured size are refused with 413: a pure ASGI middleware
for the FastAPI routes, and `read_body` for the message route, which reads its own."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatmeter.errors import error_response


class BodyTooLarge(Exception):
    pass


def declared_too_large(scope: Scope, max_bytes: int) -> bool:
    """The Content-Length header passes the limit (or is not a number)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > max_bytes):
            return True
    return False


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    """The whole body; raises BodyTooLarge as soon as it passes `max_bytes`."""
    parts: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left: what came is all there is
        part = message.get("body", b"")
        received += len(part)
        if received > max_bytes:
            raise BodyTooLarge
        parts.append(part)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def too_large_response(max_bytes: int) -> Response:
    return error_response(413, "PAYLOAD_TOO_LARGE", f"The body is over {max_bytes} bytes.")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declared_too_large(scope, self.max_bytes):
            await too_large_response(self.max_bytes)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await too_large_response(self.max_bytes)(scope, receive, send)
