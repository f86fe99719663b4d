"""The container image (issue 18): built from the Dockerfile with Podman on a Debian base
made here, then run from its mounted filesystem (see tests/deploy/container.py for why
not `podman run`): it migrates, serves /readyz, passes its own HEALTHCHECK, streams a
reply from the embedded model, and runs as its non-root user."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory

from chatmeter.auth.tokens import mint_token
from chatmeter.db.migrate import alembic_config
from tests.deploy.container import (
    BASE_IMAGE,
    IMAGE,
    REPO,
    Container,
    build_image,
    ensure_base_image,
    exclusive,
    ids,
    inspect,
    process_tree,
    running,
)
from tests.support.postgres import PostgresServer
from tools.bench.postgres import PG_BIN

# a cold build (base image, dependencies) takes minutes; a warm one reuses both
pytestmark = pytest.mark.timeout(1800)
UID = 10001
# the image adds the venv to its base: the dependencies, llama.cpp (stripped) and the model
MAX_ADDED_MB = 300
SECRET = "image-test-secret-that-is-long-enough-for-hs256"


@pytest.fixture(scope="module")
def image() -> Iterator[dict[str, Any]]:
    assert os.geteuid() == 0, "building and mounting images needs root (as on CI)"
    with exclusive():
        base_seconds = ensure_base_image()
        build_seconds = build_image()
        print(f"\nbase image {base_seconds:.0f} s, image build {build_seconds:.0f} s")
        yield inspect(IMAGE)


@pytest.fixture(scope="module")
def container(
    image: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    # development mode (no CHATMETER_JWT_SECRET): the secret is made in the volume
    with running(IMAGE, tmp_path_factory.mktemp("container")) as started:
        answer = probe(started, "ready", "--within", "300")
        assert answer["status"] == 200, f"{answer}\n{started.output()}"
        yield started


@pytest.fixture(scope="module")
def postgres_container(
    image: dict[str, Any], postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """The image as compose.yaml runs it: on PostgreSQL, with a configured JWT secret and
    a mounted settings file. The server's socket folder is mounted in (the container has
    its own network), and opened to other users so that the image's user reaches it."""
    postgres.createdb("chatmeter_image")
    postgres.root.chmod(0o711)
    workdir = tmp_path_factory.mktemp("postgres-container")
    settings = workdir / "settings"
    settings.mkdir()
    (settings / "chatmeter.toml").write_text("default_token_limit = 12345\n")
    env = {
        "CHATMETER_DATABASE_URL": "postgresql+asyncpg://postgres@/chatmeter_image"
        f"?host=/run/postgresql&port={postgres.port}",
        "CHATMETER_JWT_SECRET": SECRET,
        "CHATMETER_CONFIG": "/etc/chatmeter/chatmeter.toml",
    }
    binds = {postgres.root: "/run/postgresql", settings: "/etc/chatmeter"}
    with running(IMAGE, workdir, env, binds) as started:
        answer = probe(started, "ready", "--within", "300")
        assert answer["status"] == 200, f"{answer}\n{started.output()}"
        yield started


def probe(container: Container, *args: str) -> dict[str, Any]:
    line = container.inside(sys.executable, "-m", "tests.deploy.probe", *args)
    done = subprocess.run(line, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{done.stderr}\n{container.output()}"
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_image_is_configured_for_a_runtime(image: dict[str, Any]) -> None:
    config = image["Config"]
    uid, gid = (int(n) for n in config["User"].split(":"))
    assert (uid, gid) == (UID, UID)
    assert config["Entrypoint"] == ["chatmeter-entrypoint"]
    assert config["WorkingDir"] == "/data"
    assert "/data" in config["Volumes"]
    assert "8000/tcp" in config["ExposedPorts"]
    # configuration only through CHATMETER_* (and no secret, no build-time pip settings)
    names = {entry.split("=", 1)[0] for entry in config["Env"]}
    assert {n for n in names if not n.startswith("CHATMETER_")} <= {
        "PATH",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
    }
    assert "CHATMETER_JWT_SECRET" not in names
    health = image["Config"].get("Healthcheck") or image.get("Healthcheck")
    assert health and health["Test"][0] == "CMD" and "/readyz" in " ".join(health["Test"])


def test_image_is_small(image: dict[str, Any]) -> None:
    added = (image["Size"] - inspect(BASE_IMAGE)["Size"]) / 1e6
    print(f"\nimage {image['Size'] / 1e6:.0f} MB, of which {added:.0f} MB over its base")
    assert added < MAX_ADDED_MB


def test_entrypoint_migrates_the_volume_database(container: Container) -> None:
    database = container.data / "chatmeter.db"
    assert database.stat().st_uid == UID
    with sqlite3.connect(database) as connection:
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    url = "sqlite+aiosqlite:///" + str(database)
    assert version == ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert "Uvicorn running on http://0.0.0.0:8000" in container.output()


def test_healthcheck_command_passes(container: Container, image: dict[str, Any]) -> None:
    health = image["Config"].get("Healthcheck") or image["Healthcheck"]
    done = container.exec(*health["Test"][1:])
    assert done.returncode == 0, done.stderr


def test_streams_a_reply_from_the_embedded_model(container: Container) -> None:
    minted = container.exec("chatmeter-entrypoint", "chatmeter", "token", "--user", "alice")
    assert minted.returncode == 0, minted.stderr
    # the development secret the token was signed with lives in the volume
    assert (container.data / ".chatmeter" / "dev-jwt-secret").stat().st_uid == UID
    answer = probe(container, "chat", "--token", minted.stdout.strip())
    assert answer["created"] == 201 and answer["status"] == 200, answer
    assert answer["text"].strip(), answer
    end = answer["events"][-1]
    assert end["done"] is True and end["finish_reason"] in ("stop", "length"), end
    assert end["usage"]["completion_tokens"] > 0
    assert answer["usage"]["total_tokens_used"] == end["tokens_used"] > 0


def test_runs_as_the_non_root_user(container: Container) -> None:
    tree = process_tree(container.pid)
    assert len(tree) >= 2  # the server and its SQLite writer process
    for pid in tree:
        uids, gids = ids(pid)
        assert set(uids) == {UID} and set(gids) == {UID}, (pid, uids, gids)
    for path in Path(container.data).rglob("*"):
        assert path.stat().st_uid == UID, path


def test_runs_on_postgres_with_a_secret_and_a_settings_file(
    postgres_container: Container, postgres: PostgresServer
) -> None:
    version = subprocess.run(
        [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres",
         "-d", "chatmeter_image", "-tAc", "SELECT version_num FROM alembic_version"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    url = "sqlite+aiosqlite:///unused.db"
    assert version == ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    token = mint_token(SECRET, "bob", ttl_seconds=600)
    answer = probe(postgres_container, "chat", "--token", token)
    assert answer["status"] == 200 and answer["text"].strip(), answer
    assert answer["events"][-1]["done"] is True, answer
    # the settings file was read; no development secret was made
    assert answer["usage"]["token_limit"] == 12345
    assert answer["usage"]["total_tokens_used"] == answer["events"][-1]["tokens_used"] > 0
    assert "development mode" not in postgres_container.output()
    assert not (postgres_container.data / ".chatmeter").exists()
    for pid in process_tree(postgres_container.pid):
        assert set(ids(pid)[0]) == {UID}
