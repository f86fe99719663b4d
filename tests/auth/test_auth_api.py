"""Authentication over real HTTP (SPEC section 3), on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest

from chatmeter.config import Settings
from tests.conftest import TEST_SECRET, auth, token_for
from tests.support.jwks import RSA_KID, JwksServer, claims_for, hand_signed, serve_jwks
from tests.support.server import serve
from tests.support.shared_server import fresh, shared_server_fixtures

backend, server, client = shared_server_fixtures()

AUDIENCE = "chatmeter-api"
ISSUER = "https://auth.example.test/auth/v1"
SOME_CHAT = "6f1c2a52-2b0e-4a43-9a53-0d6f3d0c9d11"

# every endpoint that needs a signed-in user, with a body that would otherwise be fine
PROTECTED: list[tuple[str, str, Any]] = [
    ("GET", "/api/chat", None),
    ("POST", "/api/chat", {"title": "x"}),
    ("GET", f"/api/chat/{SOME_CHAT}", None),
    ("PATCH", f"/api/chat/{SOME_CHAT}", {"title": "x"}),
    ("DELETE", f"/api/chat/{SOME_CHAT}", None),
    ("POST", f"/api/chat/{SOME_CHAT}/message", {"message": "hi"}),
    ("POST", f"/api/chat/{SOME_CHAT}/stop", None),
    ("GET", "/api/usage", None),
    ("GET", "/api/usage/events", None),
    ("PUT", "/api/admin/users/bob/limit", {"token_limit": 5}),
    ("GET", "/api/admin/users/bob/usage", None),
]


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error", "code", "message"}
    assert body["error"] is True
    assert body["code"] == "UNAUTHORIZED"
    assert isinstance(body["message"], str) and body["message"]
    assert TEST_SECRET not in response.text
    assert response.headers["content-type"] == "application/json"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs256(claims: dict[str, Any], secret: str = TEST_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    return await client.request(method, path, json=body, headers=headers)


async def test_every_protected_endpoint_needs_a_token(client: httpx.AsyncClient) -> None:
    for method, path, body in PROTECTED:
        response = await call(client, method, path, body, {})
        assert_unauthorized(response)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Basic YWxpY2U6c2VjcmV0",
        "Token abc.def.ghi",
        "Bearerabc.def.ghi",
        "abc.def.ghi",
    ],
)
async def test_header_that_is_not_a_bearer_token(client: httpx.AsyncClient, header: str) -> None:
    assert_unauthorized(await client.get("/api/usage", headers={"Authorization": header}))


async def test_scheme_is_case_insensitive(client: httpx.AsyncClient) -> None:
    user = fresh("u")
    response = await client.get(
        "/api/usage", headers={"Authorization": f"bearer {token_for(user)}"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user


def bad_tokens(pem: bytes) -> dict[str, str]:
    now = int(time.time())
    no_exp = claims_for("alice")
    del no_exp["exp"]
    return {
        "malformed": "not-a-jwt",
        "three garbage parts": "abc.def.ghi",
        "wrong key": hs256(claims_for("alice"), "wrong-secret-that-is-long-enough-0123456789"),
        "expired": hs256(claims_for("alice", ttl=-120)),
        "no exp": hs256(no_exp),
        "alg none": jwt.encode(claims_for("alice", user_type="admin"), "", algorithm="none"),
        "not yet valid": hs256({**claims_for("alice"), "nbf": now + 600}),
        "no user": hs256({"exp": now + 600, "role": "authenticated"}),
        "pem as hmac secret": hand_signed(
            {"alg": "HS256", "typ": "JWT"}, claims_for("alice", user_type="admin"), pem
        ),
    }


async def test_bad_tokens_are_401(client: httpx.AsyncClient, jwks: JwksServer) -> None:
    for name, token in bad_tokens(jwks.rsa_public_pem).items():
        for method, path, body in PROTECTED:
            response = await call(client, method, path, body, bearer(token))
            assert response.status_code == 401, (name, method, path, response.text)
            assert_unauthorized(response)


async def test_rs256_refused_when_no_jwks_is_configured(
    client: httpx.AsyncClient, jwks: JwksServer
) -> None:
    assert_unauthorized(await client.get("/api/usage", headers=bearer(jwks.rs256(claims_for("a")))))


async def test_user_id_claim_is_preferred_over_sub(client: httpx.AsyncClient) -> None:
    user, subject = fresh("the-user"), fresh("subject")
    token = hs256(claims_for(subject, user_id=user))
    response = await client.get("/api/usage", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user
    response = await client.get("/api/usage", headers=bearer(hs256(claims_for(subject))))
    assert response.json()["user_id"] == subject


async def test_chats_belong_to_the_token_user(client: httpx.AsyncClient) -> None:
    user, subject = fresh("u1"), fresh("s")
    token = hs256(claims_for(subject, user_id=user))
    created = await client.post("/api/chat", json={}, headers=bearer(token))
    assert created.status_code == 201, created.text
    mine = await client.get("/api/chat", headers=auth(user))
    assert [c["chat_id"] for c in mine.json()["chats"]] == [created.json()["chat_id"]]
    theirs = await client.get("/api/chat", headers=auth(subject))
    assert theirs.json()["chats"] == []


async def test_admin_by_user_type_and_by_service_role(client: httpx.AsyncClient) -> None:
    admins = {
        "user_type admin": auth(fresh("root"), admin=True),
        "service_role": bearer(hs256(claims_for(fresh("svc"), role="service_role"))),
    }
    for n, (name, headers) in enumerate(admins.items()):
        bob = fresh("bob")
        put = await client.put(
            f"/api/admin/users/{bob}/limit", json={"token_limit": 77 + n}, headers=headers
        )
        assert put.status_code == 200, (name, put.text)
        assert put.json()["token_limit"] == 77 + n
        got = await client.get(f"/api/admin/users/{bob}/usage", headers=headers)
        assert got.status_code == 200, (name, got.text)
        assert (got.json()["user_id"], got.json()["token_limit"]) == (bob, 77 + n)


async def test_supabases_service_role_key_which_names_no_user_is_an_admin_only(
    client: httpx.AsyncClient,
) -> None:
    """Supabase's service-role key carries `role: service_role` and no `sub`: SPEC
    section 3 lets that role use /api/admin, so it does; it names nobody to chat as, so
    the user endpoints refuse it (401), as they refuse any token that names no user."""
    now = int(time.time())
    service = bearer(
        hs256({"iss": "supabase", "ref": "p", "role": "service_role", "iat": now, "exp": now + 60})
    )
    bob = fresh("bob")
    put = await client.put(
        f"/api/admin/users/{bob}/plan", json={"plan": "default"}, headers=service
    )
    assert put.status_code == 200, put.text
    listed = await client.get("/api/admin/users", headers=service)
    assert listed.status_code == 200, listed.text
    for method, path in (("GET", "/api/usage"), ("POST", "/api/chat"), ("GET", "/v1/models")):
        refused = await client.request(method, path, json={}, headers=service)
        assert refused.status_code == 401, (path, refused.text)
    nobody = bearer(hs256({"role": "authenticated", "iat": now, "exp": now + 60}))
    forbidden = await client.get("/api/admin/users", headers=nobody)
    assert forbidden.status_code == 401, forbidden.text


async def test_non_admin_is_forbidden_on_admin_endpoints(client: httpx.AsyncClient) -> None:
    bob = fresh("bob")
    non_admins = {
        "plain user": auth(fresh("alice")),
        "admin in a claim that means nothing": bearer(hs256(claims_for(fresh("c"), admin=True))),
        "authenticated role": bearer(hs256(claims_for(fresh("c"), role="authenticated"))),
        "other user_type": bearer(hs256(claims_for(fresh("d"), user_type="moderator"))),
        "the user themself": auth(bob),
    }
    for name, headers in non_admins.items():
        for method, path, body in [
            ("PUT", f"/api/admin/users/{bob}/limit", {"token_limit": 5}),
            ("GET", f"/api/admin/users/{bob}/usage", None),
        ]:
            response = await call(client, method, path, body, headers)
            assert response.status_code == 403, (name, path, response.text)
            body = response.json()
            assert set(body) == {"error", "code", "message"}
            assert (body["error"], body["code"]) == (True, "FORBIDDEN")
    # and the refused PUTs changed nothing
    usage = await client.get(f"/api/admin/users/{bob}/usage", headers=auth("root", admin=True))
    assert usage.json()["token_limit"] == 100_000


@pytest.fixture
def jwks_settings(
    settings_factory: Callable[..., Settings], jwks: JwksServer
) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        return settings_factory(jwt_jwks_url=jwks.url, **overrides)

    return build


async def test_jwks_tokens_with_audience_and_issuer(
    jwks_settings: Callable[..., Settings], jwks: JwksServer
) -> None:
    settings = jwks_settings(jwt_audience=AUDIENCE, jwt_issuer=ISSUER)
    good = claims_for("someone", aud=AUDIENCE, iss=ISSUER)
    async with serve(settings) as running, httpx.AsyncClient(base_url=running.url) as client:
        accepted = {
            "RS256": jwks.rs256({**good, "user_id": "rsa-user"}),
            "ES256": jwks.es256({**good, "user_id": "ec-user"}),
            "HS256": hs256({**good, "user_id": "hs-user"}),
        }
        for algorithm, token in accepted.items():
            response = await client.get("/api/usage", headers=bearer(token))
            assert response.status_code == 200, (algorithm, response.text)
            assert response.json()["user_id"] == accepted_user(algorithm)

        refused = {
            "wrong audience": jwks.rs256({**good, "aud": "other-api"}),
            "no audience": jwks.es256({k: v for k, v in good.items() if k != "aud"}),
            "wrong issuer": jwks.es256({**good, "iss": "https://evil.example.test"}),
            "no issuer": hs256({k: v for k, v in good.items() if k != "iss"}),
            "unknown kid": jwks.rs256(good, kid="retired-key"),
            "expired": jwks.rs256({**good, "exp": int(time.time()) - 120}),
            "pem as hmac secret": hand_signed(
                {"alg": "HS256", "kid": RSA_KID},
                {**good, "user_type": "admin"},
                jwks.rsa_public_pem,
            ),
        }
        for name, token in refused.items():
            response = await client.get("/api/usage", headers=bearer(token))
            assert response.status_code == 401, (name, response.text)
            assert_unauthorized(response)

        admin = jwks.es256({**good, "role": "service_role"})
        response = await client.get("/api/admin/users/x/usage", headers=bearer(admin))
        assert response.status_code == 200, response.text


def accepted_user(algorithm: str) -> str:
    return {"RS256": "rsa-user", "ES256": "ec-user", "HS256": "hs-user"}[algorithm]


async def test_jwks_only_refuses_hs256(
    jwks_settings: Callable[..., Settings], jwks: JwksServer
) -> None:
    async with (
        serve(jwks_settings(jwt_secret=None)) as running,
        httpx.AsyncClient(base_url=running.url) as client,
    ):
        ok = await client.get("/api/usage", headers=bearer(jwks.rs256(claims_for("r"))))
        assert ok.status_code == 200, ok.text
        assert_unauthorized(await client.get("/api/usage", headers=auth("r")))
        chat = await client.post("/api/chat", json={}, headers=bearer(jwks.es256(claims_for("e"))))
        assert chat.status_code == 201, chat.text
        uuid.UUID(chat.json()["chat_id"])


async def test_an_unreachable_key_set_is_503_not_a_sign_out(
    settings_factory: Callable[..., Settings], jwks: JwksServer
) -> None:
    """The identity provider's keys cannot be fetched (never were): the token is not at
    fault, so no 401 (the web page signs its user out on one) but 503 AUTH_UNAVAILABLE,
    to retry; /v1 answers it in OpenAI's shape."""
    settings = settings_factory(jwt_jwks_url="http://127.0.0.1:9/.well-known/jwks.json")
    token = jwks.rs256(claims_for("waiting"))
    async with serve(settings) as running, httpx.AsyncClient(base_url=running.url) as client:
        response = await client.get("/api/usage", headers=bearer(token))
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "AUTH_UNAVAILABLE"
        assert response.headers["Retry-After"] == "5"
        models = await client.get("/v1/models", headers=bearer(token))
        assert models.status_code == 503, models.text
        assert models.json()["error"]["code"] == "auth_unavailable"
        # an HS256 token is still checked against the secret: no key set involved
        assert (await client.get("/api/usage", headers=auth("hs-user"))).status_code == 200
