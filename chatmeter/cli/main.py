"""`chatmeter`: serve, mint tokens, migrate, manage budgets, chat, benchmark."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chatmeter.auth.tokens import mint_token, parse_ttl
from chatmeter.bench.cli import bench as bench_command
from chatmeter.cli.chat import chat_command
from chatmeter.config import ConfigError, Settings, dev_jwt_secret, load_settings

app = typer.Typer(
    help="chatmeter: a self-hosted backend for AI chat with exact token metering.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
users_app = typer.Typer(help="Users' token budgets.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.command("chat")(chat_command)
app.command("bench")(bench_command)
console = Console()
errors = Console(stderr=True)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        errors.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1)] = 1,
) -> None:
    """Serve the API and the web chat page."""
    import uvicorn

    from chatmeter.http_protocol import http_protocol

    settings = settings_or_exit()  # fail before forking workers, naming the bad key
    if not settings.jwt_secret and not settings.jwt_jwks_url:
        _print_dev_banner(settings, host, port)
    uvicorn.run(
        "chatmeter.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=http_protocol(settings),  # httptools, with bounded heads and a read timeout
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=30,
    )


def _print_dev_banner(settings: Settings, host: str, port: int) -> None:
    """Development mode (no secret configured): a ready token and the page address."""
    secret = dev_jwt_secret(settings)
    dev_token = mint_token(secret, "dev-user", admin=True, ttl_seconds=7 * 86400)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown_host}:{port}"
    console.rule("[bold]chatmeter[/bold] (development mode)")
    # soft_wrap: a link cut into lines by the terminal width cannot be copied whole
    console.print(f"Web chat:  {base}/#token={dev_token}", soft_wrap=True)
    console.print(f"API docs:  {base}/docs")
    console.print(f"Token:     {dev_token}", soft_wrap=True)
    console.print(
        f'Try:       curl -N -H "Authorization: Bearer $TOKEN" {base}/api/chat', soft_wrap=True
    )
    console.print(f"The secret is kept in {settings.dev_secret_file} (git-ignored).")
    console.rule()


@app.command()
def token(
    user: Annotated[str, typer.Option(help="User id (the token's sub and user_id).")],
    admin: Annotated[bool, typer.Option(help="Mint an admin token.")] = False,
    ttl: Annotated[str, typer.Option(help="Lifetime: 90s, 15m, 1h, 7d.")] = "1h",
) -> None:
    """Mint an HS256 token with the configured (or development) secret."""
    settings = settings_or_exit()
    try:
        seconds = parse_ttl(ttl)
    except ValueError as exc:
        errors.print(f"[red]--ttl:[/red] {exc}")
        raise typer.Exit(2) from None
    if settings.jwt_jwks_url and not settings.jwt_secret:
        # the server would check an HS256 token against no secret: it could never pass
        errors.print(
            "[red]CHATMETER_JWT_SECRET is not set:[/red] with only CHATMETER_JWT_JWKS_URL, "
            "tokens come from your identity provider."
        )
        raise typer.Exit(2)
    secret = dev_jwt_secret(settings)
    print(
        mint_token(
            secret,
            user,
            admin=admin,
            ttl_seconds=seconds,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database schema to the latest migration."""
    from chatmeter.db.migrate import upgrade

    settings = settings_or_exit()
    with console.status("Migrating the database…"):
        upgrade(settings.database_url)
    console.print(f"[green]database is up to date[/green] ({_safe_url(settings.database_url)})")


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://…@{rest.split('@', 1)[1]}"
    return url


async def _with_connection(settings: Settings, user: str, limit: int | None) -> dict[str, int]:
    from chatmeter.db.engine import IMMEDIATE, make_engine
    from chatmeter.metering import accounts

    engine = make_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            conn = await conn.execution_options(**IMMEDIATE)
            async with conn.begin():
                if limit is None:
                    row = await accounts.read_usage(conn, user, settings.default_token_limit)
                else:
                    row = await accounts.set_limit(conn, user, limit)
                usage: dict[str, int] = accounts.usage_json(row)
                return usage
    finally:
        await engine.dispose()


def _usage_table(usage: dict[str, int]) -> Table:
    table = Table(title=f"Usage of {usage['user_id']}")
    for column in ("total_tokens_used", "reserved_tokens", "token_limit", "tokens_remaining"):
        table.add_column(column.replace("_", " "), justify="right")
    table.add_row(
        *(
            f"{usage[c]:,}"
            for c in ("total_tokens_used", "reserved_tokens", "token_limit", "tokens_remaining")
        )
    )
    return table


def _usage_or_exit(user: str, limit: int | None) -> dict[str, int]:
    from sqlalchemy.exc import SQLAlchemyError

    settings = settings_or_exit()
    try:
        return asyncio.run(_with_connection(settings, user, limit))
    except (SQLAlchemyError, OSError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        errors.print(
            f"[red]database error:[/red] {cause} ({_safe_url(settings.database_url)}). "
            "Is it reachable, and migrated with `chatmeter db upgrade`?"
        )
        raise typer.Exit(1) from None


@users_app.command("set-limit")
def users_set_limit(user: str, limit: Annotated[int, typer.Argument(min=0)]) -> None:
    """Set a user's token budget."""
    console.print(_usage_table(_usage_or_exit(user, limit)))


@users_app.command("usage")
def users_usage(user: str) -> None:
    """Show a user's usage and budget."""
    console.print(_usage_table(_usage_or_exit(user, None)))


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        errors.print(f"[red]configuration error:[/red] {exc}")
        sys.exit(2)
