"""`chatmeter keys create|list|revoke --user ID`: an admin acting for a user, with keys
the server accepts (same digest secret, from the same configuration)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import TEST_SECRET, make_settings
from tests.support.server import serve
from tests.test_cli import run


async def test_keys_made_by_the_cli_work_and_revoke_at_once(
    database_url: str, tmp_path: Path
) -> None:
    env = {"CHATMETER_JWT_SECRET": TEST_SECRET}
    made = run(
        "keys", "create", "--user", "rue", "--name", "nightly job",
        cwd=tmp_path, database_url=database_url, **env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("cm-") and "\n" not in key
    assert "shown this once" in made.stderr
    listed = run("keys", "list", "--user", "rue", cwd=tmp_path, database_url=database_url, **env)
    assert listed.returncode == 0, listed.stderr
    assert "nightly job" in listed.stdout
    assert key not in listed.stdout
    key_id = next(word for word in made.stderr.split() if word.count("-") == 4)
    async with serve(make_settings(database_url)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {key}"}
            usage = await client.get("/api/usage", headers=headers)
            assert usage.status_code == 200
            assert usage.json()["user_id"] == "rue"
            other = run(
                "keys", "revoke", key_id, "--user", "someone-else",
                cwd=tmp_path, database_url=database_url, **env,
            )  # fmt: skip
            assert other.returncode == 1
            assert (await client.get("/api/usage", headers=headers)).status_code == 200
            revoked = run(
                "keys", "revoke", key_id, "--user", "rue",
                cwd=tmp_path, database_url=database_url, **env,
            )  # fmt: skip
            assert revoked.returncode == 0, revoked.stderr
            assert (await client.get("/api/usage", headers=headers)).status_code == 401
    bad = run("keys", "revoke", "nope", "--user", "rue", cwd=tmp_path, database_url=database_url)
    assert bad.returncode == 2
