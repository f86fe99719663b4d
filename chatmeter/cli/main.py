"""`chatmeter`: serve, mint tokens, migrate, manage budgets, chat, benchmark."""

from __future__ import annotations

import asyncio
import importlib
import sys
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from chatmeter.auth.tokens import USER_ID_RULE, is_user_id, mint_token, parse_ttl
from chatmeter.cli.chat import chat_command
from chatmeter.config import ConfigError, Settings, dev_jwt_secret, load_settings
from chatmeter.db.steps import Steps
from chatmeter.metering.cost import money
from chatmeter.metering.plans import MAX_TOKEN_LIMIT

app = typer.Typer(
    help="chatmeter: a self-hosted backend for AI chat with exact token metering.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
users_app = typer.Typer(help="Users' token budgets and plans.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage reports.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys, made and revoked for a user.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(usage_app, name="usage")
app.add_typer(keys_app, name="keys")
app.command("chat")(chat_command)
console = Console()
errors = Console(stderr=True)
T = TypeVar("T")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Measure chatmeter against a bare SSE floor (SPEC §9): `make bench` in a source
    checkout, where the benchmark lives (`tools/bench`, not part of the installed package)."""
    try:
        tool = importlib.import_module("tools.bench.cli")
    except ImportError:
        errors.print(
            "the benchmark is not installed with chatmeter: run `make bench` in a checkout"
        )
        raise typer.Exit(2) from None
    tool.main(ctx.args, "chatmeter bench")


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        errors.print(f"[red]configuration error:[/red] {escape(str(exc))}")
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
    if workers > 1 and not settings.redis_url:
        errors.print(
            "[yellow]warning:[/yellow] several workers without CHATMETER_REDIS_URL: a reply "
            "can be resumed only from the worker that generates it (others answer 204), and "
            "a stop reaches another worker through "
            + ("the database poll (up to 0.5 s)" if settings.is_sqlite else "PostgreSQL NOTIFY")
        )
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


def _user_id(value: str) -> str:
    """The rule the API holds a user id to (PUT /api/admin/users/{user_id}/...)."""
    if not is_user_id(value):
        raise typer.BadParameter(USER_ID_RULE.removeprefix("user_id: "))
    return value


UserArgument = Annotated[str, typer.Argument(callback=_user_id)]


@app.command()
def token(
    user: Annotated[
        str, typer.Option(help="User id (the token's sub and user_id).", callback=_user_id)
    ],
    admin: Annotated[bool, typer.Option(help="Mint an admin token.")] = False,
    ttl: Annotated[str, typer.Option(help="Lifetime: 90s, 15m, 1h, 7d.")] = "1h",
) -> None:
    """Mint an HS256 token with the configured (or development) secret."""
    settings = settings_or_exit()
    try:
        seconds = parse_ttl(ttl)
    except ValueError as exc:
        errors.print(f"[red]--ttl:[/red] {escape(str(exc))}")
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
        upgrade(settings.database_url, default_plan=settings.default_plan)
    console.print(
        f"[green]database is up to date[/green] ({escape(_safe_url(settings.database_url))})"
    )


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://…@{rest.split('@', 1)[1]}"
    return url


async def _in_transaction(settings: Settings, steps: Callable[..., Steps[T]], *args: Any) -> T:
    """Run one transaction through the transactor the server uses, then close it."""
    from chatmeter.db.transactor import make_transactor

    transactor = make_transactor(settings.database_url, settings.sqlite_busy_timeout_ms)
    try:
        return await transactor.run(steps, *args)
    finally:
        await transactor.close()


_USAGE_COLUMNS = ("total_tokens_used", "reserved_tokens", "token_limit", "tokens_remaining")


def _usage_table(usage: dict[str, Any]) -> Table:
    """The token figures as a table; the plan, its period and the spend as its caption."""
    table = Table(title=f"Usage of {escape(usage['user_id'])}")
    for column in _USAGE_COLUMNS:
        table.add_column(column.replace("_", " "), justify="right")
    table.add_row(*("no limit" if usage[c] is None else f"{usage[c]:,}" for c in _USAGE_COLUMNS))
    spend = f"{money(usage['spend_micros'])} {usage['currency']}"
    if usage["spend_limit_micros"] is not None:
        spend += f" of {money(usage['spend_limit_micros'])}"
    resets = f", resets {usage['resets_at']}" if usage["resets_at"] else ""
    table.caption = escape(
        f"plan {usage['plan']} (period {usage['period']}{resets}), spent {spend}"
    )
    return table


def _usage_or_exit(
    user: str, limit: int | None, plan: str | None = None, unassign: bool = False
) -> dict[str, Any]:
    from chatmeter.metering import accounts
    from chatmeter.metering.plans import PlanBook

    settings = settings_or_exit()
    book = PlanBook.of(settings)
    work: Coroutine[Any, Any, accounts.UsageRow]
    if plan is not None or unassign:
        work = _in_transaction(settings, accounts.set_plan, user, plan, book)
    elif limit is not None:
        work = _in_transaction(settings, accounts.set_limit, user, limit, book)
    else:
        work = _in_transaction(settings, accounts.usage_steps, user, book)
    try:
        row = _run_or_exit(settings, work)
    except accounts.UnknownPlan:
        known = ", ".join(sorted(settings.plans))
        errors.print(f"[red]unknown plan[/red] {escape(repr(plan))} (configured: {escape(known)})")
        raise typer.Exit(2) from None
    return accounts.usage_json(row, book)


def _database_errors() -> tuple[type[Exception], ...]:
    """What a database that is away, or not migrated, raises through the transactor."""
    import sqlite3

    import asyncpg

    return (OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)


def _database_error(settings: Settings, exc: Exception) -> typer.Exit:
    cause = (str(exc) or type(exc).__name__).splitlines()[0]
    errors.print(
        f"[red]database error:[/red] {escape(cause)} ({escape(_safe_url(settings.database_url))}). "
        "Is it reachable, and migrated with `chatmeter db upgrade`?"
    )
    return typer.Exit(1)


def _run_or_exit(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    """Run a database command; a database that is away is a clear message, exit 1."""
    try:
        return asyncio.run(work)
    except _database_errors() as exc:
        raise _database_error(settings, exc) from None


@users_app.command("set-limit")
def users_set_limit(
    user: UserArgument, limit: Annotated[int, typer.Argument(min=0, max=MAX_TOKEN_LIMIT)]
) -> None:
    """Set a user's token budget (over the plan's, until a plan is assigned again)."""
    console.print(_usage_table(_usage_or_exit(user, limit)))


@users_app.command("set-plan")
def users_set_plan(
    user: UserArgument,
    plan: Annotated[str | None, typer.Argument(show_default=False)] = None,
    unassign: Annotated[
        bool,
        typer.Option(
            "--unassign", help="Back on CHATMETER_DEFAULT_PLAN, followed when it changes."
        ),
    ] = False,
) -> None:
    """Put a user on a plan (SPEC section 10), or with --unassign back on the default."""
    if (plan is None) != unassign:
        errors.print("[red]name a plan, or --unassign[/red] (one of them)")
        raise typer.Exit(2)
    console.print(_usage_table(_usage_or_exit(user, None, plan, unassign)))


@users_app.command("usage")
def users_usage(user: UserArgument) -> None:
    """Show a user's usage and budget."""
    console.print(_usage_table(_usage_or_exit(user, None)))


async def _report_rows(
    settings: Settings, first: str | None, last: str | None, by: str
) -> list[dict[str, Any]]:
    from chatmeter.db.tables import utcnow
    from chatmeter.metering.summary import DayRange, group_by, summarize

    zone = settings.zone
    days = DayRange.parse(first, last, utcnow().astimezone(zone).date())
    grouping = group_by(by, ("day", "model", "user"))
    return await _in_transaction(
        settings, summarize, days, zone, grouping, None, settings.is_sqlite
    )


UserOption = Annotated[
    str, typer.Option("--user", help="The user the key acts as.", callback=_user_id)
]


@keys_app.command("create")
def keys_create(
    user: UserOption,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
) -> None:
    """Make a key for a user and print it: it is shown this once."""
    from chatmeter.auth.key_store import create_key
    from chatmeter.auth.keys import KeyDigester, key_digest_secret
    from chatmeter.errors import ApiError

    settings = settings_or_exit()
    clean = name.strip()
    if not clean or len(clean) > 100 or not clean.isprintable():
        errors.print("[red]--name:[/red] 1 to 100 printable characters")
        raise typer.Exit(2)
    digester = KeyDigester(key_digest_secret(settings))
    try:
        created = _run_or_exit(
            settings, _in_transaction(settings, create_key, digester, user, clean)
        )
    except ApiError as exc:
        errors.print(f"[red]{escape(exc.message)}[/red]")
        raise typer.Exit(1) from None
    errors.print(
        escape(f"key {created['key_id']} ({created['name']}) for {user}; shown this once:")
    )
    print(created["key"])


@keys_app.command("list")
def keys_list(user: UserOption) -> None:
    """A user's live keys (never their secrets)."""
    from chatmeter.auth.key_store import list_keys

    settings = settings_or_exit()
    keys = _run_or_exit(settings, _in_transaction(settings, list_keys, user))
    table = Table(title=f"API keys of {escape(user)}")
    for column in ("key_id", "name", "created_at", "last_used_at"):
        table.add_column(column.replace("_", " "))
    for key in keys:
        table.add_row(
            key["key_id"], escape(key["name"]), key["created_at"], key["last_used_at"] or "-"
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, user: UserOption) -> None:
    """Revoke a user's key: it stops working at once, on every worker."""
    from chatmeter.auth.key_store import revoke_key

    settings = settings_or_exit()
    try:
        key_uuid = uuid.UUID(key_id)
    except ValueError:
        errors.print("[red]KEY_ID:[/red] not a valid UUID")
        raise typer.Exit(2) from None
    revoked = _run_or_exit(settings, _in_transaction(settings, revoke_key, user, key_uuid))
    if not revoked:
        errors.print(f"[red]{escape(user)} holds no live key {escape(key_id)}[/red]")
        raise typer.Exit(1)
    console.print(f"[green]revoked[/green] {key_id}")


@usage_app.command("report")
def usage_report(
    first: Annotated[
        str | None, typer.Option("--from", help="First day, YYYY-MM-DD (default: 30 days ago).")
    ] = None,
    last: Annotated[
        str | None, typer.Option("--to", help="Last day, YYYY-MM-DD (default: today).")
    ] = None,
    by: Annotated[str, typer.Option("--by", help="Group by day, model or user.")] = "day",
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV to stdout, with a header.")] = False,
) -> None:
    """Everyone's usage by day (in CHATMETER_TIMEZONE), model or user."""
    from chatmeter.errors import ApiError
    from chatmeter.metering.summary import SUM_FIELDS
    from chatmeter.metering.summary import as_csv as csv_text

    settings = settings_or_exit()
    try:
        rows = asyncio.run(_report_rows(settings, first, last, by))
    except ApiError as exc:
        errors.print(f"[red]{escape(exc.message.replace('from', '--from', 1))}[/red]")
        raise typer.Exit(2) from None
    except _database_errors() as exc:
        raise _database_error(settings, exc) from None
    if as_csv:
        sys.stdout.write(csv_text(rows, by))  # type: ignore[arg-type]
        return
    table = Table(title=f"Usage by {escape(by)} ({settings.currency})")
    table.add_column(by)
    for column in ("requests", *SUM_FIELDS):
        table.add_column(
            "cost" if column == "cost_micros" else column.replace("_", " "), justify="right"
        )
    for row in rows:
        figures = [f"{row[c]:,}" for c in ("requests", *SUM_FIELDS[:-1])]
        table.add_row(escape(str(row[by])), *figures, str(money(row["cost_micros"])))
    if not rows:
        table.caption = "no usage in these days"
    console.print(table)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        errors.print(f"[red]configuration error:[/red] {escape(str(exc))}")
        sys.exit(2)
