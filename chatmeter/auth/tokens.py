"""Verify and mint JWTs (SPEC section 3). Supabase tokens work unchanged."""

from __future__ import annotations

import asyncio
import math
import time
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"})
MAX_TOKEN_CHARS = 8192
VERIFIED_TTL = 300.0
VERIFIED_MAX = 10_000
# signing keys seen in the identity provider's key set, kept for when it cannot be reached
SEEN_KEYS_MAX = 64


class InvalidToken(Exception):
    """Any reason a token is refused. The message is safe to show (it names no secret)."""


class KeysUnavailable(Exception):
    """The identity provider's key set cannot be fetched, and the token's key was never
    seen in it: the token may well be good, and nothing can tell yet."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str  # NO_USER: a service (Supabase's service-role key names no user)
    email: str | None = None
    user_type: str | None = None
    email_verified: bool | None = None
    is_admin: bool = False

    @property
    def is_service(self) -> bool:
        return self.user_id == NO_USER


NO_USER = ""
SERVICE_ROLE = "service_role"


class TokenVerifier:
    """Checks signature, `exp`, and `aud`/`iss` when configured.

    The algorithm decides the key: HMAC tokens are checked only against the shared
    secret, RSA/EC tokens only against the JWKS. So a token signed with HS256 using a
    JWKS public key as the "secret" (the classic confusion attack) never verifies."""

    def __init__(
        self,
        *,
        secret: str | None,
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        algorithms: tuple[str, ...] = ("HS256", "RS256", "ES256"),
        jwks_lifespan: float = 300.0,
    ) -> None:
        self._secret = secret
        self._jwks = (
            jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=jwks_lifespan) if jwks_url else None
        )
        # the signing keys the key set held, by kid: while it cannot be fetched (the
        # identity provider's outage), tokens signed with them still verify, instead of
        # every user being signed out when the cached set's lifespan ends
        self._seen_keys: OrderedDict[str, Any] = OrderedDict()
        self._audience = audience
        self._issuer = issuer
        self._algorithms = frozenset(algorithms)
        # verified tokens, until they expire (and at most VERIFIED_TTL): a chat client
        # sends the same token with every message, and checking a signature costs more
        # than the rest of a request's authentication
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None and known[1] > time.time():
            return known[0]
        principal, expires = await self._verify(token)
        self._verified[token] = (principal, min(expires, time.time() + VERIFIED_TTL))
        if len(self._verified) > VERIFIED_MAX:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise InvalidToken("token algorithm not accepted")
        key: Any
        if algorithm in HMAC_ALGORITHMS:
            if not self._secret:
                raise InvalidToken("token algorithm not accepted")
            key = self._secret
        elif algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            key = await self._signing_key(token)
        else:
            raise InvalidToken("token algorithm not accepted")
        claims = self._decode(token, key, algorithm)
        check_registered_claims(claims)
        return principal_from_claims(claims), float(claims["exp"])

    async def _signing_key(self, token: str) -> Any:
        assert self._jwks is not None
        try:
            # PyJWKClient fetches over blocking urllib (cached afterwards): keep it off the loop
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError:
            return self._key_seen_before(token)
        except jwt.PyJWKClientError:
            raise InvalidToken("token signing key not found") from None
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        if signing_key.key_id:
            self._seen_keys[signing_key.key_id] = signing_key.key
            self._seen_keys.move_to_end(signing_key.key_id)
            if len(self._seen_keys) > SEEN_KEYS_MAX:
                self._seen_keys.popitem(last=False)
        return signing_key.key

    def _key_seen_before(self, token: str) -> Any:
        """The key set cannot be fetched: the token's key if an earlier fetch had it."""
        kid = jwt.get_unverified_header(token).get("kid")
        key = self._seen_keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise KeysUnavailable("the identity provider's signing keys cannot be fetched")
        return key

    def _decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise InvalidToken("token not meant for this service") from None
        except jwt.MissingRequiredClaimError as exc:
            # a configured aud/iss that the token lacks is a token for someone else
            if exc.claim in ("aud", "iss"):
                raise InvalidToken("token not meant for this service") from None
            raise InvalidToken("token lacks an expiry") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("invalid token") from None


NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
STRING_CLAIMS = ("iss", "sub", "jti")


def check_registered_claims(claims: dict[str, Any]) -> None:
    """RFC 7519's registered claims have types: `exp`, `nbf`, `iat` are JSON numbers, `iss`,
    `sub`, `jti` strings, `aud` a string or a list of them. PyJWT reads `"exp":
    "1999999999"` as a number; a token that spells a claim otherwise than its issuer
    would is not one chatmeter trusts."""
    for name in NUMERIC_DATE_CLAIMS:
        if name in claims and not _is_moment(claims[name]):
            raise InvalidToken(f"token claim {name} is not a number")
    for name in STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise InvalidToken(f"token claim {name} is not a string")
    if "aud" in claims:
        audience = claims["aud"]
        if not isinstance(audience, str) and not (
            isinstance(audience, list) and all(isinstance(item, str) for item in audience)
        ):
            raise InvalidToken("token claim aud is not a string or a list of strings")


def _is_moment(value: object) -> bool:
    """A finite JSON number that a float holds (a longer integer overflows it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _storable_id(text: str) -> bool:
    """No control characters (PostgreSQL refuses NUL in text) and no lone surrogates
    (no UTF-8 encoder takes them): such an id could not be stored as a user."""
    if text.isascii():
        return text.isprintable()
    return not any(unicodedata.category(char) in ("Cc", "Cs") for char in text)


USER_ID_RULE = "user_id: must be 1 to 255 characters, not blank, no control characters"


def is_user_id(text: str) -> bool:
    """A user id the tables can hold: not blank, at most 255 characters, storable."""
    return bool(text.strip()) and len(text) <= 255 and _storable_id(text)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    user_id = claims.get("user_id") or claims.get("sub")
    if user_id is None and claims.get("role") == SERVICE_ROLE:
        # Supabase's service-role key names no user, and SPEC section 3 lets its role
        # use /api/admin: an admin that is nobody (`deps.current_user` refuses it)
        return Principal(user_id=NO_USER, is_admin=True)
    # bool is an int to Python, but `true` names nobody
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise InvalidToken("token names no user")
    user_id = str(user_id)
    if not is_user_id(user_id):
        raise InvalidToken("token names no user")
    user_type = claims.get("user_type")
    user_type = user_type if isinstance(user_type, str) else None
    email = claims.get("email")
    verified = claims.get("email_verified")
    return Principal(
        user_id=user_id,
        email=email if isinstance(email, str) else None,
        user_type=user_type,
        email_verified=verified if isinstance(verified, bool) else None,
        is_admin=user_type == "admin" or claims.get("role") == SERVICE_ROLE,
    )


def mint_token(
    secret: str,
    user_id: str,
    *,
    admin: bool = False,
    ttl_seconds: int = 3600,
    audience: str | None = None,
    issuer: str | None = None,
    email: str | None = None,
) -> str:
    """An HS256 token as Supabase would issue it, for development and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "user_id": user_id,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "role": "authenticated",
        "user_type": "admin" if admin else "user",
    }
    if email:
        claims["email"] = email
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def parse_ttl(text: str) -> int:
    """'90', '90s', '15m', '1h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
        seconds = int(number) * units[unit]
    except ValueError:
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h, 7d") from None
    if seconds <= 0:
        raise ValueError("the duration must be positive")
    return seconds
