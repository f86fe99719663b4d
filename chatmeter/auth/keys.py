"""API keys (SPEC section 12): secrets a user makes to call `/v1` and `/api` as themself.

A key is `cm-` and 256 random bits; the server keeps only its HMAC-SHA256 under a server
secret. A random key needs no slow password hash: nothing short of the key itself finds
its digest, and the keyed hash means a copy of the database alone cannot even test a
guess. The digest is the lookup (a unique index), compared again in constant time.

Every request with a key reads its row, through the same transactor as the message path:
a revoked key is refused at once on every worker and host, with no cache to outlive it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from chatmeter.auth.tokens import InvalidToken, Principal
from chatmeter.config import Settings, dev_jwt_secret
from chatmeter.db.steps import Sql, Steps
from chatmeter.db.tables import utcnow

if TYPE_CHECKING:  # the SQLite writer process imports this module: keep it light
    from chatmeter.db.transactor import Transactor

log = logging.getLogger("chatmeter.auth")
KEY_PREFIX = "cm-"
_KEY_SHAPE = re.compile(r"cm-[A-Za-z0-9_-]{43}")
# `last_used_at` is written at most this often per key: a write per request would turn
# every read of the key into a write
LAST_USED_EVERY = timedelta(seconds=60)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def key_digest_secret(settings: Settings) -> bytes:
    """The HMAC key of digests: `CHATMETER_API_KEY_SECRET`, else one derived from the
    JWT secret (the development secret in development), kept apart by a label so a
    digest never doubles as anything signed with the JWT secret."""
    if not settings.api_key_secret and not settings.jwt_secret and settings.jwt_jwks_url:
        # tokens come from an identity provider, keys from a file of this host's: they
        # break on another host, and on this one when the file is lost (a container's)
        log.warning(
            "API key digests use this host's development secret (%s): set "
            "CHATMETER_API_KEY_SECRET, or keys will not work on other hosts or after "
            "that file is lost",
            settings.dev_secret_file,
        )
    base = settings.api_key_secret or dev_jwt_secret(settings)
    return hmac.new(base.encode(), b"chatmeter api key digest v1", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class KeyDigester:
    secret: bytes

    def digest(self, key: str) -> str:
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()


def key_owner_steps(digest: str, now: datetime) -> Steps[tuple[str, str] | None]:
    """The user and stored digest of the live key with `digest`; marks it used (at most
    once per LAST_USED_EVERY)."""
    rows = yield Sql(
        "SELECT key_id, user_id, key_digest FROM api_keys "
        "WHERE key_digest = :digest AND revoked_at IS NULL",
        {"digest": digest},
    )
    if not rows:
        return None
    key_id, user_id, stored = rows[0]
    yield Sql(
        "UPDATE api_keys SET last_used_at = :now WHERE key_id = :key_id "
        "AND (last_used_at IS NULL OR last_used_at < :stale) RETURNING key_id",
        {"now": now, "key_id": key_id, "stale": now - LAST_USED_EVERY},
    )
    return str(user_id), str(stored)


async def authenticate_key(transactor: Transactor, digester: KeyDigester, key: str) -> Principal:
    """The user a key acts as. Raises InvalidToken for a malformed, unknown or revoked
    key. A key carries no admin rights: those come from the identity provider's claims,
    which a key cannot re-check."""
    if not _KEY_SHAPE.fullmatch(key):
        raise InvalidToken("malformed API key")
    digest = digester.digest(key)
    found = await transactor.run(key_owner_steps, digest, utcnow())
    if found is None or not hmac.compare_digest(found[1], digest):
        raise InvalidToken("unknown or revoked API key")
    return Principal(user_id=found[0])
