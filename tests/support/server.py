"""chatmeter served by a real uvicorn on a loopback port, inside the test's event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmeter.app import Chatmeter, create_app
from chatmeter.config import Settings
from chatmeter.db.engine import make_engine
from chatmeter.http_protocol import http_protocol
from chatmeter.services import Services


class RunningServer:
    def __init__(self, app: Chatmeter, url: str, engine: AsyncEngine) -> None:
        self.app = app
        self.url = url
        # the test's own look at the database, as an auditor would (the server has none)
        self.engine = engine

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[RunningServer]:
    app = create_app(settings)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it every response body waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=http_protocol(settings),  # as `chatmeter serve` has it
        log_level="warning",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    engine = make_engine(settings.database_url)
    try:
        yield RunningServer(app, f"http://127.0.0.1:{port}", engine)
    finally:
        server.should_exit = True
        await task
        sock.close()
        await engine.dispose()
