"""compose.yaml (issue 18), checked as far as this machine allows: against the Compose
Specification's JSON schema, resolved by podman-compose with .env.example, and for the
shape a production deployment needs. (`compose up` itself cannot run here: no registry
for the postgres and redis images, and no `podman run`.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chatmeter.config import Settings, load_settings
from tests.deploy.container import REPO

BIN = Path(sys.executable).parent
COMPOSE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """`podman-compose config`: the file with its variables resolved from `env_file`."""
    env = {k: v for k, v in os.environ.items() if k not in env_names(ENV_EXAMPLE)}
    return subprocess.run(
        [str(BIN / "podman-compose"), "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def env_names(path: Path) -> set[str]:
    return set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", path.read_text(), re.M))


def resolved() -> dict[str, Any]:
    done = compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = yaml.safe_load(done.stdout)
    return found


def test_compose_file_matches_the_compose_specification() -> None:
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_secrets_come_from_the_env_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = compose_config(empty)
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr
    environment = resolved()["services"]["chatmeter"]["environment"]
    assert environment["CHATMETER_JWT_SECRET"] == "change-me-to-openssl-rand-hex-32"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_chatmeter_waits_for_healthy_postgres_and_redis() -> None:
    services = resolved()["services"]
    assert set(services) == {"chatmeter", "postgres", "redis"}
    for service in services.values():
        assert service["healthcheck"]["test"], service
    assert services["chatmeter"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert re.fullmatch(r"postgres:15(-\w+)?", services["postgres"]["image"])
    assert re.fullmatch(r"redis:7(-\w+)?", services["redis"]["image"])
    # only chatmeter is published; the database and Redis stay on the compose network
    assert "ports" not in services["postgres"] and "ports" not in services["redis"]


def test_chatmeter_is_configured_for_postgres_redis_and_the_data_volume() -> None:
    config = resolved()
    chatmeter = config["services"]["chatmeter"]
    environment = chatmeter["environment"]
    assert environment["CHATMETER_REDIS_URL"] == "redis://redis:6379/0"
    known = {"CHATMETER_" + name.upper() for name in Settings.model_fields} | {
        "CHATMETER_CONFIG",
        "CHATMETER_REDIS_URL",  # SPEC section 11
    }
    assert {k for k in environment if k.startswith("CHATMETER_")} <= known
    # the values chatmeter itself accepts (the database URL, the settings file)
    settings = load_settings(
        environ={
            "CHATMETER_DATABASE_URL": environment["CHATMETER_DATABASE_URL"],
            "CHATMETER_JWT_SECRET": environment["CHATMETER_JWT_SECRET"],
            "CHATMETER_CONFIG": str(REPO / "deploy" / "chatmeter.toml"),
        }
    )
    assert settings.database_url.startswith("postgresql+asyncpg://chatmeter:")
    assert settings.database_url.endswith("@postgres:5432/chatmeter")
    volumes = chatmeter["volumes"]
    assert any(v.startswith("chatmeter-data:/data") for v in volumes)
    toml = environment["CHATMETER_CONFIG"]
    assert any(v.endswith(f":{toml}:ro") for v in volumes)
    assert {"chatmeter-data", "postgres-data"} <= set(config["volumes"])


def test_compose_healthcheck_is_the_images() -> None:
    """One health check: the Dockerfile's HEALTHCHECK, repeated for runtimes that drop it
    (Podman's OCI image format)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*?\n\s+CMD (\[[^\n]*\])$", dockerfile, re.M | re.S)
    assert match, "no HEALTHCHECK … CMD [...] in the Dockerfile"
    image_check = json.loads(match.group(1))
    compose_check = resolved()["services"]["chatmeter"]["healthcheck"]["test"]
    assert compose_check == ["CMD", *image_check]
