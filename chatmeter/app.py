"""The ASGI application: routers, error handlers and the lifespan that builds services."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from chatmeter import __version__
from chatmeter.auth.routes import router as keys_router
from chatmeter.chats.routes import router as chats_router
from chatmeter.collector import collect_young_less_often
from chatmeter.config import Settings, load_settings
from chatmeter.cors import ApiCors
from chatmeter.errors import install_error_handlers
from chatmeter.limits import BodySizeLimit
from chatmeter.metering.admin_users import router as admin_users_router
from chatmeter.metering.plan_routes import router as plans_router
from chatmeter.metering.routes import router as usage_router
from chatmeter.observability.logs import keep_content_out_of_logs
from chatmeter.openapi import install_openapi
from chatmeter.services import start_services
from chatmeter.streaming.routes import MESSAGE_PATH, MessageEndpoint
from chatmeter.streaming.routes import OPERATION as MESSAGE_OPERATION
from chatmeter.streaming.routes import router as stream_router
from chatmeter.system_routes import router as system_router
from chatmeter.v1.endpoint import OpenAIEndpoint, is_v1
from chatmeter.v1.schemas import V1_MODELS, v1_operations
from chatmeter.web.routes import router as web_router

DESCRIPTION = (
    "Self-hosted backend for AI chat: signed-in users chat with a model over a streaming "
    "API, conversations are stored, and every token the provider bills is metered "
    "against each user's budget."
)


class Chatmeter:
    """The ASGI application: the message route served directly (`MessageEndpoint`: it is
    the hot path), `/v1` by `OpenAIEndpoint` (OpenAI's shapes, errors included),
    everything else by FastAPI (`api`), which also runs the lifespan."""

    def __init__(
        self,
        api: FastAPI,
        messages: MessageEndpoint,
        openai: OpenAIEndpoint,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self.api = api
        self.messages = messages
        self.openai = openai
        # CORS wraps both: the message route bypasses FastAPI's middleware
        self._entry: ASGIApp = ApiCors(self._route, cors_origins) if cors_origins else self._route

    @property
    def state(self) -> State:
        return self.api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (match := MESSAGE_PATH.fullmatch(scope["path"])):
            await self.messages(scope, receive, send, match[1])
        elif scope["type"] == "http" and is_v1(scope["path"]):
            await self.openai(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(settings: Settings) -> Chatmeter:
    keep_content_out_of_logs(settings.log_content)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await start_services(settings)
        # what start-up built lives as long as the process: keep it out of every
        # garbage collection pass (the collector was ~8% of CPU per exchange)
        gc.freeze()
        try:
            yield
        finally:
            await app.state.services.aclose()

    app = FastAPI(
        title="chatmeter", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    routers = (
        chats_router,
        stream_router,
        usage_router,
        plans_router,
        keys_router,
        admin_users_router,
        system_router,
        web_router,
    )
    for router in routers:
        app.include_router(router)
    install_openapi(
        app,
        {
            "/api/chat/{chat_id}/message": {"post": MESSAGE_OPERATION},
            **v1_operations(sorted(settings.models)),
        },
        V1_MODELS,
    )
    return Chatmeter(
        app,
        MessageEndpoint(app.state, settings.max_body_bytes),
        OpenAIEndpoint(app.state, settings.max_body_bytes),
        settings.cors_origins,
    )


def create_app_from_env() -> Chatmeter:
    """The app as `uvicorn --factory` builds it in each worker: settings from the
    environment, logging configured, garbage collected less often."""
    collect_young_less_often()
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return create_app(settings)
