"""TokenVerifier on its own (SPEC section 3): what it accepts, what it refuses, and why."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chatmeter.auth.tokens import (
    InvalidToken,
    KeysUnavailable,
    TokenVerifier,
    mint_token,
    parse_ttl,
    principal_from_claims,
)
from tests.conftest import TEST_SECRET
from tests.support.jwks import (
    EC_KID,
    RSA_KID,
    JwksServer,
    b64url,
    claims_for,
    hand_signed,
    serve_jwks,
)

AUDIENCE = "chatmeter-api"
LONG_SECRET = "a-secret-long-enough-for-hs512-" + "0123456789abcdef" * 3
ISSUER = "https://auth.example.test/auth/v1"


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


def hs256(claims: dict[str, Any], secret: str = TEST_SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    message = str(caught.value)
    assert TEST_SECRET not in message
    return message


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=TEST_SECRET)


async def test_minted_token_is_accepted_with_its_claims(verifier: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, "alice", email="alice@example.com")
    principal = await verifier.verify(token)
    assert principal.user_id == "alice"
    assert principal.email == "alice@example.com"
    assert principal.user_type == "user"
    assert principal.is_admin is False


async def test_minted_admin_token_is_admin(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(mint_token(TEST_SECRET, "root", admin=True))
    assert principal.user_type == "admin"
    assert principal.is_admin is True


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "....", "Bearer x.y.z", "é.é.é"])
async def test_malformed_token_is_refused(verifier: TokenVerifier, token: str) -> None:
    assert await refused(verifier, token) == "malformed token"


async def test_header_that_is_not_an_object_is_refused(verifier: TokenVerifier) -> None:
    token = f"{b64url(b'[1, 2]')}.{b64url(b'{}')}.{b64url(b'sig')}"
    assert await refused(verifier, token) == "malformed token"


async def test_oversized_token_is_refused(verifier: TokenVerifier) -> None:
    token = hs256(claims_for("alice", padding="x" * 9000))
    assert await refused(verifier, token) == "token too long"


async def test_wrong_secret_is_refused(verifier: TokenVerifier) -> None:
    token = hs256(claims_for("alice"), secret="another-secret-that-is-long-enough-0123456789")
    assert await refused(verifier, token) == "invalid token"


async def test_tampered_payload_is_refused(verifier: TokenVerifier) -> None:
    header, _, signature = hs256(claims_for("alice")).split(".")
    forged = b64url(json.dumps(claims_for("mallory", user_type="admin")).encode())
    assert await refused(verifier, f"{header}.{forged}.{signature}") == "invalid token"


async def test_expired_token_is_refused(verifier: TokenVerifier) -> None:
    assert await refused(verifier, hs256(claims_for("alice", ttl=-60))) == "token expired"


async def test_token_within_leeway_is_accepted(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(hs256(claims_for("alice", ttl=-2)))
    assert principal.user_id == "alice"


async def test_token_without_exp_is_refused(verifier: TokenVerifier) -> None:
    claims = claims_for("alice")
    del claims["exp"]
    assert await refused(verifier, hs256(claims)) == "token lacks an expiry"


async def test_non_numeric_exp_is_refused(verifier: TokenVerifier) -> None:
    claims = {**claims_for("alice"), "exp": "tomorrow"}
    assert await refused(verifier, hs256(claims)) == "invalid token"


FAR = int(time.time()) + 3600
WRONG_TYPES: dict[str, dict[str, object]] = {
    "exp a numeric string": {"exp": str(FAR)},
    "exp a float string": {"exp": f"{FAR}.0"},
    "nbf a numeric string": {"nbf": "1000000000"},
    "iat a numeric string": {"iat": "1000000000"},
    "iat a list": {"iat": [1000000000]},
    "iat true": {"iat": True},
    "nbf null": {"nbf": None},
    "sub a number": {"sub": 42, "user_id": "alice"},
    "iss a number": {"iss": 7},
    "iss an object": {"iss": {"url": ISSUER}},
    "aud a number": {"aud": 1},
    "aud a list holding a number": {"aud": ["chatmeter-api", 2]},
    "jti a number": {"jti": 12345},
    # JSON integers past any float: math.isfinite and float() raised OverflowError, a 500
    "exp past any float": {"exp": 10**400},
    "iat past any float": {"iat": 10**400},
}


@pytest.mark.parametrize("name", WRONG_TYPES)
async def test_registered_claims_of_the_wrong_type_are_refused(
    verifier: TokenVerifier, name: str
) -> None:
    """SPEC §3: `exp` as a string (PyJWT would read "1999999999" as a number) and the other
    registered claims spelled as no issuer would are 401, even when well signed."""
    claims = {**claims_for("alice"), **WRONG_TYPES[name]}
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, claims, TEST_SECRET.encode())
    await refused(verifier, token)


async def test_registered_claims_of_the_right_types_are_accepted(verifier: TokenVerifier) -> None:
    claims = {
        **claims_for("alice"),
        "exp": FAR + 0.5,
        "nbf": 1000000000,
        "iat": 1000000000.25,
        "iss": ISSUER,
        "jti": "abc",
        "aud": ["chatmeter-api", "other"],
    }
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, claims, TEST_SECRET.encode())
    assert (await verifier.verify(token)).user_id == "alice"


async def test_not_yet_valid_token_is_refused(verifier: TokenVerifier) -> None:
    claims = {**claims_for("alice"), "nbf": int(time.time()) + 600}
    assert await refused(verifier, hs256(claims)) == "token not yet valid"


async def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    unsigned = jwt.encode(claims_for("alice", user_type="admin"), "", algorithm="none")
    assert await refused(verifier, unsigned) == "token algorithm not accepted"
    for alg in ("None", "NONE", "nOnE"):
        header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        body = b64url(json.dumps(claims_for("alice")).encode())
        assert await refused(verifier, f"{header}.{body}.") == "token algorithm not accepted"


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
async def test_hmac_algorithm_not_configured_is_refused(
    verifier: TokenVerifier, algorithm: str
) -> None:
    token = jwt.encode(claims_for("alice"), LONG_SECRET, algorithm=algorithm)
    assert await refused(verifier, token) == "token algorithm not accepted"


async def test_configured_algorithms_are_the_only_ones_accepted() -> None:
    only_hs512 = TokenVerifier(secret=LONG_SECRET, algorithms=("HS512",))
    token = hs256(claims_for("alice"), secret=LONG_SECRET)
    assert await refused(only_hs512, token) == "token algorithm not accepted"
    token = jwt.encode(claims_for("alice"), LONG_SECRET, algorithm="HS512")
    assert (await only_hs512.verify(token)).user_id == "alice"


async def test_hs256_without_a_secret_is_refused(jwks: JwksServer) -> None:
    verifier = TokenVerifier(secret=None, jwks_url=jwks.url)
    assert await refused(verifier, hs256(claims_for("alice"))) == "token algorithm not accepted"


async def test_rs256_without_a_jwks_is_refused(verifier: TokenVerifier, jwks: JwksServer) -> None:
    token = jwks.rs256(claims_for("alice"))
    assert await refused(verifier, token) == "token algorithm not accepted"


async def test_audience_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, audience=AUDIENCE)
    accepted = await verifier.verify(hs256(claims_for("alice", aud=AUDIENCE)))
    assert accepted.user_id == "alice"
    listed = await verifier.verify(hs256(claims_for("alice", aud=["other", AUDIENCE])))
    assert listed.user_id == "alice"
    wrong = hs256(claims_for("alice", aud="another-api"))
    assert await refused(verifier, wrong) == "token not meant for this service"
    missing = hs256(claims_for("alice"))
    assert await refused(verifier, missing) == "token not meant for this service"


async def test_audience_ignored_when_not_configured(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(hs256(claims_for("alice", aud="authenticated")))
    assert principal.user_id == "alice"


async def test_issuer_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, issuer=ISSUER)
    assert (await verifier.verify(hs256(claims_for("alice", iss=ISSUER)))).user_id == "alice"
    wrong = hs256(claims_for("alice", iss="https://evil.example.test"))
    assert await refused(verifier, wrong) == "token not meant for this service"
    missing = hs256(claims_for("alice"))
    assert await refused(verifier, missing) == "token not meant for this service"


async def test_issuer_ignored_when_not_configured(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(hs256(claims_for("alice", iss="anyone")))
    assert principal.user_id == "alice"


async def test_rs256_and_es256_through_the_jwks(jwks: JwksServer) -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, jwks_url=jwks.url)
    rsa_user = await verifier.verify(jwks.rs256(claims_for("rsa-user", email="r@example.com")))
    assert (rsa_user.user_id, rsa_user.email, rsa_user.is_admin) == (
        "rsa-user",
        "r@example.com",
        False,
    )
    ec_user = await verifier.verify(jwks.es256(claims_for("ec-user", user_type="admin")))
    assert (ec_user.user_id, ec_user.is_admin) == ("ec-user", True)
    # HS256 still works next to the JWKS
    assert (await verifier.verify(hs256(claims_for("hs-user")))).user_id == "hs-user"


async def test_jwks_tokens_check_exp_audience_and_issuer(jwks: JwksServer) -> None:
    verifier = TokenVerifier(secret=None, jwks_url=jwks.url, audience=AUDIENCE, issuer=ISSUER)
    good = claims_for("alice", aud=AUDIENCE, iss=ISSUER)
    assert (await verifier.verify(jwks.rs256(good))).user_id == "alice"
    assert (await verifier.verify(jwks.es256(good))).user_id == "alice"
    expired = {**good, "exp": int(time.time()) - 60}
    assert await refused(verifier, jwks.es256(expired)) == "token expired"
    wrong_aud = {**good, "aud": "someone-else"}
    assert await refused(verifier, jwks.rs256(wrong_aud)) == "token not meant for this service"
    wrong_iss = {**good, "iss": "https://evil.example.test"}
    assert await refused(verifier, jwks.es256(wrong_iss)) == "token not meant for this service"


async def test_kid_not_in_the_jwks_is_refused(jwks: JwksServer) -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, jwks_url=jwks.url)
    token = jwks.rs256(claims_for("alice"), kid="rotated-away")
    assert await refused(verifier, token) == "token signing key not found"
    no_kid = jwt.encode(claims_for("alice"), jwks.rsa_key, algorithm="RS256")
    assert await refused(verifier, no_kid) == "token signing key not found"


async def test_right_kid_wrong_key_is_refused(jwks: JwksServer) -> None:
    verifier = TokenVerifier(secret=TEST_SECRET, jwks_url=jwks.url)
    impostor_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        claims_for("alice"), impostor_rsa, algorithm="RS256", headers={"kid": RSA_KID}
    )
    assert await refused(verifier, forged) == "invalid token"
    impostor_ec = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        claims_for("alice"), impostor_ec, algorithm="ES256", headers={"kid": EC_KID}
    )
    assert await refused(verifier, forged) == "invalid token"


async def test_algorithm_that_does_not_match_the_key_is_refused(jwks: JwksServer) -> None:
    """An ES256 header naming the RSA key: never verified with the wrong kind of key."""
    verifier = TokenVerifier(secret=TEST_SECRET, jwks_url=jwks.url)
    token = jwt.encode(
        claims_for("alice"), jwks.ec_key, algorithm="ES256", headers={"kid": RSA_KID}
    )
    assert await refused(verifier, token) == "invalid token"


async def test_hs256_signed_with_the_jwks_public_key_is_refused(jwks: JwksServer) -> None:
    """The algorithm-confusion attack: the public PEM used as an HMAC secret."""
    verifier = TokenVerifier(secret=TEST_SECRET, jwks_url=jwks.url)
    claims = claims_for("mallory", user_type="admin")
    for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "kid": RSA_KID}):
        token = hand_signed(header, claims, jwks.rsa_public_pem)
        assert await refused(verifier, token) == "invalid token"
    no_secret = TokenVerifier(secret=None, jwks_url=jwks.url)
    token = hand_signed({"alg": "HS256", "kid": RSA_KID}, claims, jwks.rsa_public_pem)
    assert await refused(no_secret, token) == "token algorithm not accepted"


async def test_unreachable_jwks_is_not_the_tokens_fault(jwks: JwksServer) -> None:
    """A key set never fetched: nothing can tell a good token from a bad one yet, and a
    401 would sign the user out (the API answers 503 AUTH_UNAVAILABLE)."""
    verifier = TokenVerifier(secret=None, jwks_url="http://127.0.0.1:9/jwks.json")
    with pytest.raises(KeysUnavailable):
        await verifier.verify(jwks.rs256(claims_for("alice")))


async def test_keys_seen_before_still_verify_while_the_key_set_is_unreachable() -> None:
    """The identity provider's outage outlasts the cached key set's lifespan: tokens
    signed with a key the set held still verify; a key it never held cannot be checked
    (KeysUnavailable), and a bad signature is still refused."""
    provider = JwksServer()
    provider.start()
    verifier = TokenVerifier(secret=None, jwks_url=provider.url, jwks_lifespan=0.001)
    assert (await verifier.verify(provider.rs256(claims_for("before")))).user_id == "before"
    provider.stop()
    assert (await verifier.verify(provider.rs256(claims_for("during")))).user_id == "during"
    with pytest.raises(KeysUnavailable):
        await verifier.verify(provider.es256(claims_for("never-seen")))
    forged = JwksServer().rs256(claims_for("mallory"))  # another key, the same kid
    assert await refused(verifier, forged) == "invalid token"


async def test_jwks_is_fetched_once_and_cached(jwks: JwksServer) -> None:
    verifier = TokenVerifier(secret=None, jwks_url=jwks.url)
    before = jwks.requests
    for n in range(5):
        assert (await verifier.verify(jwks.rs256(claims_for(f"u{n}")))).user_id == f"u{n}"
        assert (await verifier.verify(jwks.es256(claims_for(f"e{n}")))).user_id == f"e{n}"
    assert jwks.requests - before == 1


async def test_user_id_claim_is_preferred_over_sub(verifier: TokenVerifier) -> None:
    both = await verifier.verify(hs256(claims_for("the-sub", user_id="the-user-id")))
    assert both.user_id == "the-user-id"
    only_sub = await verifier.verify(hs256(claims_for("the-sub")))
    assert only_sub.user_id == "the-sub"
    claims = claims_for("ignored", user_id="from-user-id")
    del claims["sub"]
    assert (await verifier.verify(hs256(claims))).user_id == "from-user-id"


@pytest.mark.parametrize(
    "user", [None, "", "   ", ["a"], {"id": 1}, True, 1.5, "x" * 256, "nul\x00byte", "tab\tid"]
)
async def test_token_naming_no_usable_user_is_refused(
    verifier: TokenVerifier, user: object
) -> None:
    claims = claims_for("placeholder")
    del claims["sub"]
    if user is not None:
        claims["user_id"] = user
    assert await refused(verifier, hs256(claims)) == "token names no user"


@pytest.mark.parametrize("subject", ["", "   ", "x" * 256])
async def test_subject_naming_no_usable_user_is_refused(
    verifier: TokenVerifier, subject: str
) -> None:
    assert await refused(verifier, hs256(claims_for(subject))) == "token names no user"


async def test_subject_that_is_not_text_is_refused(verifier: TokenVerifier) -> None:
    claims = {**claims_for("x"), "sub": ["alice"]}
    assert await refused(verifier, hs256(claims)) == "invalid token"


async def test_numeric_user_id_becomes_text(verifier: TokenVerifier) -> None:
    claims = {**claims_for("x"), "user_id": 42}
    assert (await verifier.verify(hs256(claims))).user_id == "42"


def test_supabase_claims_are_read() -> None:
    principal = principal_from_claims(
        {
            "sub": "8f0c0e4e-0000-4000-8000-000000000001",
            "email": "person@example.com",
            "email_verified": True,
            "user_type": "member",
            "role": "authenticated",
        }
    )
    assert principal.user_id == "8f0c0e4e-0000-4000-8000-000000000001"
    assert principal.email == "person@example.com"
    assert principal.email_verified is True
    assert principal.user_type == "member"
    assert principal.is_admin is False


@pytest.mark.parametrize(
    ("claims", "admin"),
    [
        ({"user_type": "admin"}, True),
        ({"role": "service_role"}, True),
        ({"user_type": "user", "role": "service_role"}, True),
        ({"user_type": "Admin"}, False),
        ({"role": "authenticated"}, False),
        ({"role": "admin"}, False),
        ({"user_type": ["admin"]}, False),
        ({}, False),
    ],
)
def test_who_is_an_admin(claims: dict[str, Any], admin: bool) -> None:
    assert principal_from_claims({"sub": "u", **claims}).is_admin is admin


def test_ignores_claims_of_the_wrong_type() -> None:
    principal = principal_from_claims(
        {"sub": "u", "email": 5, "email_verified": "yes", "user_type": 1}
    )
    assert (principal.email, principal.email_verified, principal.user_type) == (None, None, None)


def test_minted_token_claims() -> None:
    before = int(time.time())
    token = mint_token(
        TEST_SECRET, "bob", admin=True, ttl_seconds=900, audience=AUDIENCE, issuer=ISSUER
    )
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["sub"] == claims["user_id"] == "bob"
    assert claims["user_type"] == "admin"
    assert (claims["aud"], claims["iss"]) == (AUDIENCE, ISSUER)
    assert claims["exp"] - claims["iat"] == 900
    assert before <= claims["iat"] <= int(time.time())
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), (" 2H ", 7200)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "abc", "1.5h", "10x", "0", "0m", "-5m", "5m5"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)
