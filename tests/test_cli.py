"""The `chatmeter` command, run as a person runs it: a subprocess of the installed script."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import pytest

from tests.conftest import TEST_SECRET
from tests.support.postgres import PostgresServer

CHATMETER = Path(sys.executable).parent / "chatmeter"


def command_env(database_url: str | None, env: dict[str, str]) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHATMETER_")}
    environ |= {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    if database_url:
        environ["CHATMETER_DATABASE_URL"] = database_url
    return environ | env


def run_many(
    commands: list[tuple[list[str], dict[str, str]]], *, cwd: Path, database_url: str | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands at once (each is a Python start-up) and wait for all."""
    started = [
        (
            args,
            subprocess.Popen(
                [str(CHATMETER), *args],
                cwd=cwd,
                env=command_env(database_url, env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args, env in commands
    ]
    results = []
    for args, process in started:
        stdout, stderr = process.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


def run(
    *args: str, cwd: Path, database_url: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_many([(list(args), env)], cwd=cwd, database_url=database_url)[0]


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def table_rows(output: str) -> list[list[str]]:
    """The data rows of a rich table (the header row is drawn with heavier lines)."""
    rows = [line.strip() for line in output.splitlines() if line.strip().startswith("│")]
    return [[cell.strip() for cell in row.strip("│").split("│")] for row in rows]


def test_help(tmp_path: Path) -> None:
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "token", "db", "users"):
        assert command in result.stdout


def test_bench_runs_the_checkouts_benchmark(tmp_path: Path) -> None:
    result = run("bench", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "chatmeter bench" in result.stdout
    assert "--quick" in result.stdout


def test_bench_without_the_tools_points_to_make_bench(tmp_path: Path) -> None:
    # an installed wheel: chatmeter without the checkout's `tools` package
    no_tools = (
        "import sys; sys.modules['tools'] = None; sys.argv = ['chatmeter', 'bench', '--quick']; "
        "from chatmeter.cli.main import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", no_tools],
        cwd=tmp_path,
        env=command_env(None, {}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "make bench" in result.stderr


def test_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    url = sqlite_url(path)
    first = run("db", "upgrade", cwd=tmp_path, database_url=url)
    assert first.returncode == 0, first.stderr
    assert "up to date" in first.stdout
    with sqlite3.connect(path) as conn:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert {"chats", "messages", "user_usage", "usage_events", "alembic_version"} <= tables
    again = run("db", "upgrade", cwd=tmp_path, database_url=url)
    assert again.returncode == 0, again.stderr


def test_db_upgrade_on_postgres_hides_the_password(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    name = f"cli_{uuid.uuid4().hex[:10]}"
    postgres.createdb(name)
    # trust authentication accepts any password, so one can be shown not to leak
    url = postgres.url(name).replace("postgres@", "postgres:hunter2-secret@")
    result = run("db", "upgrade", cwd=tmp_path, database_url=url)
    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout + result.stderr
    usage = run("users", "usage", "pg-user", cwd=tmp_path, database_url=url)
    assert usage.returncode == 0, usage.stderr
    assert table_rows(usage.stdout) == [["0", "0", "100,000", "100,000"]]


def test_token_is_signed_with_the_configured_secret(tmp_path: Path) -> None:
    before = int(time.time())
    result = run(
        "token",
        "--user",
        "u1",
        "--admin",
        "--ttl",
        "15m",
        cwd=tmp_path,
        CHATMETER_JWT_SECRET=TEST_SECRET,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == claims["user_id"] == "u1"
    assert claims["user_type"] == "admin"
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert before <= claims["iat"] <= int(time.time()) + 1
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-long-enough-for-hs256-0123456789", algorithms=["HS256"])


def test_token_carries_the_configured_audience_and_issuer(tmp_path: Path) -> None:
    result = run(
        "token",
        "--user",
        "u2",
        cwd=tmp_path,
        CHATMETER_JWT_SECRET=TEST_SECRET,
        CHATMETER_JWT_AUDIENCE="authenticated",
        CHATMETER_JWT_ISSUER="https://auth.example.test",
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(
        result.stdout.strip(),
        TEST_SECRET,
        algorithms=["HS256"],
        audience="authenticated",
        issuer="https://auth.example.test",
    )
    assert claims["user_type"] == "user"
    assert claims["exp"] - claims["iat"] == 3600  # the default --ttl is 1h


def test_token_without_a_secret_uses_the_development_secret(tmp_path: Path) -> None:
    result = run("token", "--user", "dev", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    secret_file = tmp_path / ".chatmeter" / "dev-jwt-secret"
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    assert secret_file.stat().st_mode & 0o077 == 0, "the secret is readable by its owner only"
    assert jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "dev"
    again = run("token", "--user", "dev", cwd=tmp_path)
    assert jwt.decode(again.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "dev"


def test_bad_ttl_exits_2_with_a_message(tmp_path: Path) -> None:
    ttls = ["soon", "0m", "-5m", "1.5h"]
    secret = {"CHATMETER_JWT_SECRET": TEST_SECRET}
    commands = [(["token", "--user", "u1", f"--ttl={ttl}"], secret) for ttl in ttls]
    for ttl, result in zip(ttls, run_many(commands, cwd=tmp_path), strict=True):
        assert result.returncode == 2, (ttl, result.stdout, result.stderr)
        assert result.stdout == "", ttl
        assert "--ttl" in result.stderr, (ttl, result.stderr)


def test_users_set_limit_and_usage(database_url: str, tmp_path: Path) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    default_limit = {"CHATMETER_DEFAULT_TOKEN_LIMIT": "4321"}
    set_limit, newcomer = run_many(
        [
            (["users", "set-limit", user, "500"], {}),
            (["users", "usage", "newcomer"], default_limit),
        ],
        cwd=tmp_path,
        database_url=database_url,
    )
    assert set_limit.returncode == 0, set_limit.stderr
    assert user in set_limit.stdout
    assert table_rows(set_limit.stdout) == [["0", "0", "500", "500"]]
    # a user seen for the first time gets the default limit
    assert newcomer.returncode == 0, newcomer.stderr
    assert table_rows(newcomer.stdout) == [["0", "0", "4,321", "4,321"]]

    usage = run("users", "usage", user, cwd=tmp_path, database_url=database_url)
    assert usage.returncode == 0, usage.stderr
    assert user in usage.stdout
    assert table_rows(usage.stdout) == [["0", "0", "500", "500"]]  # used, reserved, limit, left


def test_negative_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    result = run(
        "users", "set-limit", "u1", "--", "-5", cwd=tmp_path, database_url=sqlite_url(path)
    )
    assert result.returncode == 2
    assert not path.exists()


def test_limits_and_user_ids_the_api_refuses_are_refused_changing_nothing(
    database_url: str, tmp_path: Path
) -> None:
    # the same bounds as PUT /api/admin/users/{user_id}/limit: a limit past 2**62 (the
    # budget statements' arithmetic stays below 2**63), a user id blank or over 255
    # characters; each a message and exit 2, never a traceback, and nothing written
    huge, long_id = str(2**62 + 1), "u" * 256
    commands = [
        ["users", "set-limit", "u1", huge],
        ["users", "set-limit", "u1", "1" + "0" * 20],
        ["users", "set-limit", " ", "5"],
        ["users", "set-limit", long_id, "5"],
        ["users", "set-plan", "", "default"],
        ["users", "usage", long_id],
        ["keys", "create", "--user", long_id],
        ["keys", "list", "--user", " "],
        ["token", "--user", ""],  # a token naming nobody, which every server refuses
        ["token", "--user", long_id],
    ]
    results = run_many([(c, {}) for c in commands], cwd=tmp_path, database_url=database_url)
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, command
        assert result.stdout == "", command
    usage = run("users", "usage", "u1", cwd=tmp_path, database_url=database_url)
    assert table_rows(usage.stdout) == [["0", "0", "100,000", "100,000"]]
    assert (
        run(
            "users", "set-limit", "u1", str(2**62), cwd=tmp_path, database_url=database_url
        ).returncode
        == 0
    )


def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = {
        "CHATMETER_DEFAULT_TOKEN_LIMIT": "lots",
        "CHATMETER_DATABASE_URL": "mysql://localhost/chatmeter",
        "CHATMETER_NO_SUCH_SETTING": "1",
        "CHATMETER_DEFAULT_MODEL": "not-configured",
    }
    commands = [(["users", "usage", "u1"], {key: value}) for key, value in bad.items()]
    commands.append((["token", "--user", "u1"], {"CHATMETER_HISTORY_MESSAGES": "-1"}))
    # a token minted with no secret could never pass a server that only has a JWKS
    jwks_only = {"CHATMETER_JWT_JWKS_URL": "https://auth.example.test/jwks.json"}
    commands.append((["token", "--user", "u1"], jwks_only))
    keys = [*bad, "CHATMETER_HISTORY_MESSAGES", "CHATMETER_JWT_SECRET"]
    for key, result in zip(keys, run_many(commands, cwd=tmp_path), strict=True):
        assert result.returncode == 2, (key, result.stderr)
        assert key in result.stderr, (key, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


def test_users_on_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "empty.db")
    result = run("users", "usage", "u1", cwd=tmp_path, database_url=url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "chatmeter db upgrade" in " ".join(result.stderr.split())


def test_users_set_plan_and_usage_report(database_url: str, tmp_path: Path) -> None:
    toml = tmp_path / "plans.toml"
    toml.write_text('[plans.free]\ntoken_limit = 300\nperiod = "day"\n')
    config = {"CHATMETER_CONFIG": str(toml)}
    user = f"user-{uuid.uuid4().hex[:8]}"
    set_plan, unknown, report, as_csv, bad = run_many(
        [
            (["users", "set-plan", user, "free"], config),
            (["users", "set-plan", user, "gold"], config),
            (["usage", "report", "--by", "model"], config),
            (["usage", "report", "--by", "user", "--csv"], config),
            (["usage", "report", "--from", "2026-05-02", "--to", "2026-05-01"], config),
        ],
        cwd=tmp_path,
        database_url=database_url,
    )
    assert set_plan.returncode == 0, set_plan.stderr
    assert table_rows(set_plan.stdout) == [["0", "0", "300", "300"]]
    assert "plan free (period day" in " ".join(set_plan.stdout.split())
    assert unknown.returncode == 2 and "gold" in unknown.stderr
    assert report.returncode == 0, report.stderr
    assert "Usage by model" in report.stdout
    assert as_csv.returncode == 0, as_csv.stderr
    assert as_csv.stdout.splitlines() == [
        "user,requests,prompt_tokens,completion_tokens,thinking_tokens,cached_tokens,"
        "total_tokens,cost_micros"
    ]
    assert bad.returncode == 2 and "after" in bad.stderr
    # back on the configured default (the built-in plan, here), or a clear refusal
    unassigned, neither, both = run_many(
        [
            (["users", "set-plan", user, "--unassign"], config),
            (["users", "set-plan", user], config),
            (["users", "set-plan", user, "free", "--unassign"], config),
        ],
        cwd=tmp_path,
        database_url=database_url,
    )
    assert unassigned.returncode == 0, unassigned.stderr
    assert "plan default (period none" in " ".join(unassigned.stdout.split())
    for refused in (neither, both):
        assert refused.returncode == 2 and "--unassign" in refused.stderr, refused.stderr
