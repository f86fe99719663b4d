"""The pages during an identity provider's outage (SPEC 3, section 13): a token whose
signing key cannot be fetched is 503 AUTH_UNAVAILABLE, not the token's fault, so neither
page drops it and the person is told why."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.conftest import make_settings, scripted
from tests.support.jwks import JwksServer, claims_for, serve_jwks
from tests.support.server import serve

UNREACHABLE = "http://127.0.0.1:9/.well-known/jwks.json"
TOKEN_KEY = "chatmeter.token"


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


@pytest.mark.parametrize("path", ["/", "/admin"])
async def test_a_token_the_key_set_cannot_check_is_kept_and_the_outage_explained(
    sqlite_url: str, jwks: JwksServer, open_page: Callable[..., Any], path: str
) -> None:
    settings = make_settings(
        sqlite_url,
        default_model="main",
        models={"main": scripted(reply="Hello.")},
        jwt_jwks_url=UNREACHABLE,
    )
    token = jwks.rs256({**claims_for("boss"), "user_type": "admin"})
    async with serve(settings) as server:
        page: Page = await open_page(f"{server.url}{path}#token={token}")
        await expect(page.get_by_text("identity provider", exact=False)).to_be_visible()
        kept = await page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})")
        assert kept == token  # a reload once the keys are back signs in again
