"""`chatmeter keys create|list|revoke --user ID`: an admin acting for a user, with keys
the server accepts (same digest secret, from the same configuration)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import TEST_SECRET, make_settings
from tests.support.server import serve
from tests.test_cli import run, run_many


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


async def test_names_and_ids_that_look_like_rich_markup_are_printed_as_they_are(
    database_url: str, tmp_path: Path
) -> None:
    """Key names (any user's, through POST /api/keys), user ids (any identity
    provider's) and configured names are data: printed as rich markup, `[/]` crashed the
    command (MarkupError) after the key was made, so its secret was never shown, and
    `[red]...` restyled the output."""
    env = {"CHATMETER_JWT_SECRET": TEST_SECRET}
    user = "[/]"
    made = run(
        "keys", "create", "--user", user, "--name", "[/] [bold]job",
        cwd=tmp_path, database_url=database_url, **env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith("cm-")
    assert "([/] [bold]job) for [/]" in " ".join(made.stderr.split())
    key = made.stdout.strip()
    async with serve(make_settings(database_url)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {key}"}
            chat = await client.post("/api/chat", headers=headers, json={})
            sent = await client.post(
                f"/api/chat/{chat.json()['chat_id']}/message",
                headers=headers,
                json={"message": "hello"},
            )
            assert sent.status_code == 200
            assert '"done":true' in sent.text
    no_key = "00000000-0000-0000-0000-000000000000"
    listed, usage, report, unknown = run_many(
        [
            (["keys", "list", "--user", user], env),
            (["users", "usage", user], env),
            (["usage", "report", "--by", "user"], env),
            (["keys", "revoke", no_key, "--user", "[/red]"], env),
        ],
        cwd=tmp_path,
        database_url=database_url,
    )
    for result in (listed, usage, report):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    assert "[/] [bold]job" in listed.stdout
    assert "Usage of [/]" in usage.stdout
    assert "│ [/]" in report.stdout
    assert unknown.returncode == 1 and "[/red] holds no live key" in unknown.stderr
    config = run("users", "usage", "u", cwd=tmp_path, CHATMETER_DEFAULT_MODEL="[/]")
    assert config.returncode == 2 and "Traceback" not in config.stderr
    assert "'[/]' is not a configured model" in " ".join(config.stderr.split())
