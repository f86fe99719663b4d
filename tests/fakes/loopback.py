"""A fake provider's HTTP side: its ASGI app served by uvicorn on 127.0.0.1 in a thread of
its own, so both async tests and sync code can reach it through the real SDKs."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, Self

import uvicorn


class LoopbackServer:
    """Subclasses implement `_app` (ASGI 3) and call `super().__init__()`."""

    def __init__(self) -> None:
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        raise NotImplementedError

    @staticmethod
    async def stream_until_gone(
        receive: Any,
        send: Any,
        events: Coroutine[Any, Any, bool],
        disconnected: threading.Event,
    ) -> bool:
        """Run `events` (which writes a streamed response and says False for a scripted
        drop) while watching for the client leaving; True when the response completed."""

        async def watch() -> None:
            # After the body is read, receive() only returns once the client goes away.
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        sender = asyncio.create_task(events)
        await asyncio.wait({watcher, sender}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        sender.cancel()
        await asyncio.wait({watcher, sender})
        if sender.cancelled() or disconnected.is_set():
            return False  # the client went away: uvicorn closes the connection
        if not sender.result():
            return False  # a scripted drop: returning mid-response makes uvicorn close it
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self._app,
            interface="asgi3",  # a bound method is not recognised as ASGI 3 on its own
            proxy_headers=False,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
