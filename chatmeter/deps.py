"""Typed dependencies: the services, the signed-in user, an admin."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from chatmeter.auth.keys import authenticate_key, looks_like_key
from chatmeter.auth.tokens import InvalidToken, KeysUnavailable, Principal
from chatmeter.errors import ApiError
from chatmeter.services import Services


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def caller(request: Request, services: ServicesDep) -> Principal:
    """Who calls, from `Authorization: Bearer` with a JWT or an API key (`cm-…`): a user,
    or a service that names none (`Principal.is_service`), which only `/api/admin` takes."""
    headers = request.headers.getlist("authorization")
    # two credentials are ambiguous: a proxy in front may have checked the other one
    header = headers[0] if len(headers) == 1 else ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "UNAUTHORIZED", "Sign in: send Authorization: Bearer <token>.")
    token = token.strip()
    try:
        if looks_like_key(token):
            return await authenticate_key(services.transactor, services.key_digester, token)
        return await services.verifier.verify(token)
    except InvalidToken as exc:
        raise ApiError(401, "UNAUTHORIZED", f"Sign in again: {exc}.") from None
    except KeysUnavailable:
        # not the token's fault: a 401 would sign the user out (the web page drops it)
        raise ApiError(
            503,
            "AUTH_UNAVAILABLE",
            "Sign-in cannot be checked right now: the identity provider's keys cannot be "
            "fetched. Try again shortly.",
            headers={"Retry-After": "5"},
        ) from None


async def current_user(request: Request, services: ServicesDep) -> Principal:
    """The user who calls: a credential that names none has nobody to act as."""
    user = await caller(request, services)
    if user.is_service:
        raise ApiError(401, "UNAUTHORIZED", "Sign in again: token names no user.")
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]


async def admin_user(user: Annotated[Principal, Depends(caller)]) -> Principal:
    if not user.is_admin:
        raise ApiError(403, "FORBIDDEN", "Only an admin may do this.")
    return user


AdminUser = Annotated[Principal, Depends(admin_user)]
