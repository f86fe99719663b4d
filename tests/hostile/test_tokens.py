"""Hostile Authorization headers, against a server that checks everything it can (HS256
secret, a JWKS, audience and issuer): each is 401 UNAUTHORIZED in the error shape, and the
answer gives nothing away (no secret, no key material, no trace, no echo of the token).
tests/auth covers the ordinary refusals; these are the attacks and the garbage."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import TEST_SECRET, make_settings
from tests.hostile import RawResponse, raw_request
from tests.support.jwks import RSA_KID, JwksServer, serve_jwks
from tests.support.server import serve

AUDIENCE = "chatmeter-hostile"
ISSUER = "https://auth.hostile.test/auth/v1"
OTHER_SECRET = "another-secret-that-is-also-long-enough-0123456789"
SOME_CHAT = "0b0c1f7e-0e43-4c4e-9a2f-6d3f1d2f7a10"
NOT_UTF8 = b"\xff\xfe"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def hmac_signed(header: dict[str, Any], claims: Any, key: bytes) -> str:
    """Signed by hand: PyJWT refuses to use a public key as an HMAC secret."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(user: str = "mallory", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": user,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 600,
        "role": "authenticated",
        **extra,
    }


def admin_claims(**extra: Any) -> dict[str, Any]:
    return claims(user_type="admin", role="service_role", **extra)


def hs256(payload: dict[str, Any], secret: str = TEST_SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


@pytest.fixture(scope="module")
def attacker() -> Iterator[JwksServer]:
    """A key set the server was never told about: it must never fetch from it."""
    with serve_jwks() as server:
        yield server


@pytest.fixture
async def client(
    database_url: str, jwks: JwksServer, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        database_url,
        jwt_jwks_url=jwks.url,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        outbox_dir=str(tmp_path / "outbox"),
    )
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            yield http


def key_material(jwks: JwksServer) -> list[str]:
    rsa_public = jwks.rsa_key.public_key()
    pem = rsa_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return [
        TEST_SECRET,
        TEST_SECRET[:16],
        "BEGIN",
        pem.splitlines()[1][:24],
        jwks.keys[0]["n"][:24],
        jwks.keys[1]["x"][:24],
    ]


def fragments(header: str | bytes) -> list[str]:
    """Pieces of the credential that an answer echoing it would contain."""
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    token = text.split(" ", 1)[-1]
    pieces = [p for p in token.replace(" ", ".").split(".") if len(p) >= 8]
    return [p[:32] for p in pieces] + ([token[:16]] if len(token) >= 16 else [])


def assert_refused_quietly(
    response: httpx.Response | RawResponse, header: str | bytes, jwks: JwksServer
) -> None:
    if isinstance(response, RawResponse):
        status, headers, text = response.status, response.headers, response.body.decode()
    else:
        status, headers, text = response.status_code, dict(response.headers), response.text
    assert status == 401, text
    assert headers["content-type"] == "application/json"
    body = json.loads(text)
    assert body == {"error": True, "code": "UNAUTHORIZED", "message": body["message"]}
    message = body["message"]
    assert isinstance(message, str) and 0 < len(message) <= 120 and message.isascii()
    everything = text + "\n".join(f"{k}: {v}" for k, v in headers.items())
    for secret in key_material(jwks):
        assert secret not in everything, secret
    for piece in fragments(header):
        assert piece not in everything, piece
    for trace in ("Traceback", 'File "', "jwt.", "Error", "Exception", "line "):
        assert trace not in message, message


def hostile_tokens(jwks: JwksServer, attacker: JwksServer) -> dict[str, str]:
    rsa_public = jwks.rsa_key.public_key()
    pem = rsa_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = rsa_public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_json = json.dumps(jwks.keys[0]).encode()
    modulus = base64.urlsafe_b64decode(jwks.keys[0]["n"] + "==")
    now = int(time.time())
    unsigned = f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(admin_claims())}"
    attacker_signed = attacker.rs256(admin_claims(), kid=RSA_KID)
    return {
        # alg: none, spelled every way, with and without a signature
        "alg none": unsigned + ".",
        "alg none, no signature part": unsigned,
        "alg None": f"{segment({'alg': 'None'})}.{segment(admin_claims())}.",
        "alg NONE": f"{segment({'alg': 'NONE'})}.{segment(admin_claims())}.",
        "alg nOnE": f"{segment({'alg': 'nOnE'})}.{segment(admin_claims())}.",
        "alg none with a signature": unsigned + "." + b64url(b"x" * 32),
        "alg missing": f"{segment({'typ': 'JWT'})}.{segment(admin_claims())}.",
        "alg null": hmac_signed({"alg": None}, admin_claims(), TEST_SECRET.encode()),
        "alg a list": hmac_signed({"alg": ["HS256"]}, admin_claims(), TEST_SECRET.encode()),
        "alg HS384 with the secret": jwt.encode(admin_claims(), TEST_SECRET, algorithm="HS384"),
        # the right shape, the wrong signer
        "wrong secret": hs256(admin_claims(), OTHER_SECRET),
        "empty secret": hmac_signed({"alg": "HS256"}, admin_claims(), b""),
        "attacker's RSA key, our kid": attacker_signed,
        "signature of another token": unsigned + "." + hs256(claims()).split(".")[2],
        # key confusion: the JWKS public key used as an HMAC secret, in every encoding
        "HS256 keyed with the PEM": hmac_signed(
            {"alg": "HS256", "kid": RSA_KID}, admin_claims(), pem
        ),
        "HS256 keyed with the DER": hmac_signed(
            {"alg": "HS256", "kid": RSA_KID}, admin_claims(), der
        ),
        "HS256 keyed with the JWK": hmac_signed(
            {"alg": "HS256", "kid": RSA_KID}, admin_claims(), jwk_json
        ),
        "HS256 keyed with the modulus": hmac_signed(
            {"alg": "HS256", "kid": RSA_KID}, admin_claims(), modulus
        ),
        # keys the token brings along: never fetched, never trusted
        "jku to the attacker's keys": jwt.encode(
            admin_claims(),
            attacker.rsa_key,
            algorithm="RS256",
            headers={"kid": "attacker", "jku": attacker.url},
        ),
        "x5u to the attacker's keys": jwt.encode(
            admin_claims(),
            attacker.rsa_key,
            algorithm="RS256",
            headers={"kid": "attacker", "x5u": attacker.url},
        ),
        "embedded jwk": jwt.encode(
            admin_claims(),
            attacker.rsa_key,
            algorithm="RS256",
            headers={"kid": "attacker", "jwk": attacker.keys[0]},
        ),
        # kid as an injection vector
        # (/dev/null read as a key is empty: the token is signed with an empty key)
        "kid path traversal": hmac_signed(
            {"alg": "HS256", "kid": "../../../../../../dev/null"}, admin_claims(), b""
        ),
        "kid SQL": hmac_signed({"alg": "RS256", "kid": "' OR '1'='1"}, admin_claims(), b""),
        "kid an object": hmac_signed({"alg": "RS256", "kid": {"$ne": ""}}, admin_claims(), b""),
        "kid huge": hmac_signed({"alg": "RS256", "kid": "k" * 6000}, admin_claims(), b""),
        "crit names an unknown extension": hs256(admin_claims(), crit=["x-hostile"]),
        # time
        "expired an hour ago": hs256(admin_claims(exp=now - 3600, iat=now - 7200)),
        "expired at 0": hs256(admin_claims(exp=0)),
        "not valid for ten minutes": hs256(admin_claims(nbf=now + 600)),
        "issued in the future": hs256(admin_claims(iat=now + 600)),
        # registered claims of the wrong type (SPEC §3), well signed
        "exp a numeric string": hs256(admin_claims(exp=str(now + 3600))),
        "iat a numeric string": hs256(admin_claims(iat=str(now))),
        "nbf a numeric string": hs256(admin_claims(nbf=str(now - 60))),
        "issuer a list": hmac_signed(
            {"alg": "HS256"}, admin_claims(iss=[ISSUER]), TEST_SECRET.encode()
        ),
        # someone else's token
        "wrong audience": hs256(admin_claims(aud="another-api")),
        "audience list without ours": hs256(admin_claims(aud=["a", "b"])),
        "audience not a string": hs256(admin_claims(aud=7)),
        "wrong issuer": hs256(admin_claims(iss="https://evil.test")),
        "no audience": hs256({k: v for k, v in admin_claims().items() if k != "aud"}),
        "no issuer": hs256({k: v for k, v in admin_claims().items() if k != "iss"}),
        # well signed, but the user it names cannot be stored: refused, never a 500
        "user id with NUL": hs256(claims("mal\x00lory")),
        "user id with a control character": hs256(claims("mal\x1blory")),
        "user id a lone surrogate": hmac_signed(
            {"alg": "HS256"}, claims("\ud800"), TEST_SECRET.encode()
        ),
        # shapes that are not a JWT
        "header not an object": f"{b64url(b'[]')}.{segment(claims())}.",
        "header nested deep": f"{b64url(b'[' * 5000 + b']' * 5000)}.{segment(claims())}.",
        "payload an array": hmac_signed({"alg": "HS256"}, [1, 2], TEST_SECRET.encode()),
        "payload not JSON": f"{segment({'alg': 'HS256'})}.{b64url(NOT_UTF8)}.abc",
        "not base64": "!!!.@@@.###",
        "two dots only": "..",
        "dots around nothing": ".x.",
        "four parts": "a.b.c.d",
        "five thousand dots": "." * 5000,
        "spaces inside": "abc def.ghi jkl.mno",
        "garbage": "definitely-not-a-token-at-all",
        "60 KB": "eyJ" + "A" * 30_000 + "." + "B" * 30_000 + ".C",
    }


async def test_a_good_token_is_accepted(client: httpx.AsyncClient, jwks: JwksServer) -> None:
    """The control: the refusals below are not a server that refuses everything."""
    for token in (hs256(claims("alice")), jwks.rs256(claims("bob")), jwks.es256(claims("eve"))):
        response = await client.get("/api/usage", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text


async def test_hostile_tokens_are_refused_quietly(
    client: httpx.AsyncClient, jwks: JwksServer, attacker: JwksServer
) -> None:
    attacker.requests = 0
    for name, token in hostile_tokens(jwks, attacker).items():
        header = f"Bearer {token}"
        for method, path, body in (
            ("GET", "/api/admin/users/mallory/usage", None),
            ("POST", f"/api/chat/{SOME_CHAT}/message", {"message": "hi"}),
        ):
            response = await client.request(
                method, path, json=body, headers={"Authorization": header}
            )
            assert response.status_code == 401, (name, path, response.text)
            assert_refused_quietly(response, header, jwks)
    assert attacker.requests == 0


MALFORMED: dict[str, bytes] = {
    "bearer and nothing": b"Bearer",
    "bearer and a space": b"Bearer ",
    "bearer and spaces": b"Bearer      ",
    "non-ascii bytes": b"Bearer \xff\xfe\xfd.\x80\x81.\xc0\xaf",
    "latin-1": "Bearer caf\u00e9.\u00e9t\u00e9.na\u00efve".encode("latin-1"),
    "utf-8 emoji": "Bearer \U0001f984.\U0001f984.\U0001f984".encode(),
    "tab for a space": b"Bearer\t" + b"x" * 40,
    "60 KB": b"Bearer " + b"A" * 60_000,
    "60 KB of dots": b"bearer " + b"." * 60_000,
    "basic with the secret": b"Basic " + base64.b64encode(b"admin:" + TEST_SECRET.encode()),
    "bearer bearer": b"Bearer Bearer Bearer",
    "raw bytes only": b"\xff\xfe",
}


async def test_malformed_headers_are_refused_quietly(
    client: httpx.AsyncClient, jwks: JwksServer
) -> None:
    for name, header in MALFORMED.items():
        # sent raw: an HTTP client library refuses to send most of these
        head = b"GET /api/usage HTTP/1.1\r\nHost: chatmeter\r\nAuthorization: " + header
        response = await raw_request(str(client.base_url), head)
        assert response.status == 401, (name, response)
        assert_refused_quietly(response, header, jwks)


async def test_two_authorization_headers_are_refused(
    client: httpx.AsyncClient, jwks: JwksServer
) -> None:
    """Which one counts would depend on who reads them: a proxy may have checked the
    other. Neither order, nor two good tokens, is let through."""
    good = f"Bearer {hs256(claims('alice'))}".encode()
    other = f"Bearer {hs256(admin_claims())}".encode()
    for pair in ((good, b"Bearer x"), (b"Bearer x", good), (good, other)):
        headers = [(b"Authorization", value) for value in pair]
        response = await client.get("/api/usage", headers=headers)
        assert_refused_quietly(response, b"", jwks)
