"""Settings, read once at start-up. The only module that reads the environment."""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chatmeter.auth.tokens import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS
from chatmeter.metering.cost import Prices
from chatmeter.metering.periods import parse_period

ENV_PREFIX = "CHATMETER_"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
DEV_SECRET_FILE = ".chatmeter/dev-jwt-secret"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ORIGIN = re.compile(r"\*|https?://[A-Za-z0-9.\-\[\]:]+", re.IGNORECASE)
# the port a browser leaves out of an origin it sends
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
# settings that the environment gives as a comma-separated list
_LIST_FIELDS = frozenset({"jwt_algorithms", "cors_origins"})
DEFAULT_PLAN = "default"
# the most money a limit or a price may name: micro-units fit a 64-bit integer
MAX_AMOUNT = Decimal(10**12)
_PLAN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_MODEL_NAME = 100
# the longest duration a setting may name: a year. Longer ones (or inf) passed the checks
# and then failed at run time: a lease of 1e12 s put every reservation's expiry past year
# 9999 (OverflowError), so every message was a 500
MOST_SECONDS = 365 * 86_400


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


def _decimal(value: Any) -> Any:
    """Money from TOML: an int, a float (read through its shortest text, never float
    arithmetic) or a string of digits."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def _amount(value: Decimal | None, decimals: int = 6) -> Decimal | None:
    if value is None:
        return None
    if not value.is_finite() or value < 0 or value > MAX_AMOUNT:
        raise ValueError(f"must be a number from 0 to {MAX_AMOUNT:,}")
    if value != value.quantize(Decimal(1).scaleb(-decimals)):
        raise ValueError(f"must have at most {decimals} decimal places")
    return value


class ModelConfig(BaseModel):
    """One entry of the `[models.NAME]` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["gemini", "openai", "local", "scripted"]
    model: str = ""
    api_key_env: str | None = None
    base_url: str | None = None
    system_prompt: str | None = None
    max_output_tokens: int = Field(default=1024, ge=1, le=1_000_000)
    context_window: int = Field(default=8192, ge=64, le=100_000_000)
    # a call to the provider's HTTP API (the local model's replies make none: only counts)
    timeout_seconds: float = Field(default=60.0, gt=0, le=MOST_SECONDS)
    # scripted provider only
    reply: str = "Hello from the scripted model."
    chunks: int = Field(default=4, ge=1, le=100_000)
    delay_ms: float = Field(default=0.0, ge=0, le=MOST_SECONDS * 1000)
    # usage reporting of the scripted provider: "last" chunk, "none" (forces counting)
    usage: Literal["last", "none"] = "last"
    # local provider only
    model_path: str | None = None
    threads: int = Field(default=2, ge=1, le=256)
    parallel: int = Field(default=4, ge=1, le=64)
    # per million tokens, in CHATMETER_CURRENCY (SPEC section 10); none: the model is free
    price_input: Decimal | None = None
    price_cached_input: Decimal | None = None  # default: price_input
    price_output: Decimal | None = None
    price_thinking: Decimal | None = None  # default: price_output

    @field_validator(
        "price_input", "price_cached_input", "price_output", "price_thinking", mode="before"
    )
    @classmethod
    def _price_number(cls, value: Any) -> Any:
        return _decimal(value)

    @field_validator("price_input", "price_cached_input", "price_output", "price_thinking")
    @classmethod
    def _price_range(cls, value: Decimal | None) -> Decimal | None:
        # a price per million tokens is the price of one token in micro-units: at most
        # 6 more decimals keep every cost exact before its one rounding
        return _amount(value, decimals=12)

    @property
    def prices(self) -> Prices:
        zero = Decimal(0)
        given_input = self.price_input if self.price_input is not None else zero
        given_output = self.price_output if self.price_output is not None else zero
        return Prices(
            input=given_input,
            cached_input=(
                self.price_cached_input if self.price_cached_input is not None else given_input
            ),
            output=given_output,
            thinking=self.price_thinking if self.price_thinking is not None else given_output,
        )


class PlanConfig(BaseModel):
    """One entry of the `[plans.NAME]` table: what a user may spend and how fast."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_limit: int | None = Field(default=None, ge=0, le=2**62)
    spend_limit: Decimal | None = None  # in CHATMETER_CURRENCY
    period: str = "none"
    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    concurrent_replies: int | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator("token_limit", "requests_per_minute", "concurrent_replies", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("must be a whole number")
        return value

    @field_validator("spend_limit", mode="before")
    @classmethod
    def _spend_number(cls, value: Any) -> Any:
        return _decimal(value)

    @field_validator("spend_limit")
    @classmethod
    def _spend_range(cls, value: Decimal | None) -> Decimal | None:
        return _amount(value)

    @field_validator("period")
    @classmethod
    def _known_period(cls, value: str) -> str:
        return parse_period(value)

    @property
    def spend_limit_micros(self) -> int | None:
        if self.spend_limit is None:
            return None
        return int(self.spend_limit.scaleb(6))


def _as_browsers_send(origin: str) -> str:
    """An origin as a browser's `Origin` header has it (origins are compared as text):
    scheme and host in lower case, no default port."""
    origin = origin.lower()
    scheme = origin.partition("://")[0]
    return origin.removesuffix(_DEFAULT_PORTS.get(scheme, "\0"))


def _builtin_local() -> ModelConfig:
    return ModelConfig(
        provider="local",
        model="SmolLM2-135M-Instruct",
        max_output_tokens=512,
        context_window=8192,
    )


class Settings(BaseModel):
    """Every setting of chatmeter. Build with `load_settings()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./chatmeter.db"
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256", "RS256", "ES256")
    dev_secret_file: str = DEV_SECRET_FILE
    # the built-in plan's token limit: bounded as a plan's is, so that an error names this
    default_token_limit: int = Field(default=100_000, ge=0, le=2**62)
    history_messages: int = Field(default=10, ge=0, le=1000)
    max_message_chars: int = Field(default=5000, ge=1, le=1_000_000)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # a request (head and body) must arrive within this of the connection being ready
    request_read_timeout_seconds: float = Field(default=20.0, gt=0, le=MOST_SECONDS)
    # before default_model, which is checked against it
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    default_model: str = "local"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    ping_interval_seconds: float = Field(default=15.0, gt=0, le=MOST_SECONDS)
    provider_idle_timeout_seconds: float = Field(default=60.0, gt=0, le=MOST_SECONDS)
    reservation_ttl_seconds: float = Field(default=120.0, gt=0, le=MOST_SECONDS)
    settle_retry_seconds: float = Field(default=10.0, ge=0, le=MOST_SECONDS)
    outbox_dir: str = ".chatmeter/outbox"
    # SQLite's busy timeout is a C int: a larger one silently becomes 0 (no wait at all)
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0, le=2**31 - 1)
    # a file the SQLite writer process appends every statement it runs to, one a line
    # (for diagnosis: the benchmark counts them); none by default
    sqlite_trace_file: str | None = None
    count_cache_size: int = Field(default=4096, ge=1)
    # replies outlive their connection (SPEC section 11)
    on_disconnect: Literal["continue", "stop"] = "continue"
    replay_seconds: float = Field(default=300.0, ge=0, le=MOST_SECONDS)
    replay_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    redis_url: str | None = None
    plans: dict[str, PlanConfig] = Field(default_factory=dict)
    default_plan: str = DEFAULT_PLAN
    timezone: str = "UTC"
    currency: str = "USD"
    log_level: str = "INFO"
    log_content: bool = False
    # origins whose pages may call /api and /v1 (CORS); none by default
    cors_origins: tuple[str, ...] = ()
    # the HMAC key of API key digests: else derived from the JWT (or development) secret
    api_key_secret: str | None = Field(default=None, min_length=32)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("jwt_secret", "jwt_jwks_url", "jwt_audience", "jwt_issuer")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        # `CHATMETER_JWT_SECRET=` left empty read as no secret: development mode, which
        # prints a week-long admin token at start-up; an empty audience refused every token
        if value is not None and not value.strip():
            raise ValueError("is set but empty: give it a value, or leave it unset")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
        if not value or any(name not in known for name in value):
            raise ValueError(f"each must be one of {', '.join(sorted(known))}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        origins = tuple(origin.rstrip("/") for origin in value if origin.strip())
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], no path), nor *"
                )
        return tuple(_as_browsers_send(origin) for origin in origins)

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("default_model")
    @classmethod
    def _configured_model(cls, value: str, info: ValidationInfo) -> str:
        # here, so that the error names the key; `models` is absent when it was invalid
        models = info.data.get("models")
        if models is not None and value != "local" and value not in models:
            known = ", ".join(sorted({"local", *models}))
            raise ValueError(f"{value!r} is not a configured model (configured: {known})")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        # chats.model and usage_events.model hold MAX_MODEL_NAME characters: PostgreSQL
        # refused a longer name at the first chat and at every settlement
        for name in value:
            if not 1 <= len(name) <= MAX_MODEL_NAME:
                raise ValueError(f"{name!r}: a model name is 1 to {MAX_MODEL_NAME} characters")
        return value

    @field_validator("plans")
    @classmethod
    def _plan_names(cls, value: dict[str, PlanConfig]) -> dict[str, PlanConfig]:
        for name in value:
            if not _PLAN_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r}: a plan name is 1 to 64 letters, digits, '_', '.' or '-'"
                )
        return value

    @field_validator("default_plan")
    @classmethod
    def _configured_plan(cls, value: str, info: ValidationInfo) -> str:
        plans = info.data.get("plans")
        if plans is not None and value != DEFAULT_PLAN and value not in plans:
            known = ", ".join(sorted({DEFAULT_PLAN, *plans}))
            raise ValueError(f"{value!r} is not a configured plan (configured: {known})")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA timezone (like Europe/Paris)") from None
        return value

    @field_validator("currency")
    @classmethod
    def _currency_code(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]{3}", value):
            raise ValueError("must be a three-letter currency code like USD or EUR")
        return value

    @model_validator(mode="after")
    def _with_builtins(self) -> Settings:
        if "local" not in self.models:
            self.models["local"] = _builtin_local()
        if DEFAULT_PLAN not in self.plans:
            self.plans[DEFAULT_PLAN] = PlanConfig(token_limit=self.default_token_limit)
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def system_prompt_for(self, model_name: str) -> str:
        return self.models[model_name].system_prompt or self.system_prompt


_ENV_FIELDS = {name for name in Settings.model_fields if name not in ("models", "plans")}


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _ENV_FIELDS:
            raise ConfigError(f"unknown setting {key}")
        values[name] = [part.strip() for part in raw.split(",")] if name in _LIST_FIELDS else raw
    return values


def _toml_values(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"CHATMETER_CONFIG: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"CHATMETER_CONFIG: {path} is not valid TOML: {exc}") from exc


def _describe(exc: ValidationError, toml_keys: set[str], toml_path: str | None) -> str:
    """Each problem named as the person wrote it: `CHATMETER_X` for the environment,
    `x (in FILE)` for the TOML file."""
    problems = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"]]
        if not location:
            key = "settings"
        elif location[0] in toml_keys:
            key = f"{'.'.join(location)} (in {toml_path})"
        elif location[0] in ("models", "plans"):
            key = ".".join(location)
        else:
            key = ENV_PREFIX + location[0].upper()
        problems.append(f"{key}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read TOML (if CHATMETER_CONFIG names one), then the environment over it, then
    `overrides` (used by tests and the CLI). Raises ConfigError naming the bad key."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path = env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(_toml_values(config_path))
    toml_keys = set(values)
    from_env = _env_values(env)
    values.update(from_env)
    values.update(overrides)
    toml_keys -= {*from_env, *overrides}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_keys, config_path)) from exc


def model_api_key(model: ModelConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key a model names through `api_key_env`."""
    if not model.api_key_env:
        return None
    return (os.environ if environ is None else environ).get(model.api_key_env)


def dev_jwt_secret(settings: Settings) -> str:
    """The configured secret, else the development secret kept in a git-ignored file
    (created on first use) so tokens survive restarts."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = Path(settings.dev_secret_file)
    if not path.exists():
        _create_once(path, secrets.token_urlsafe(48) + "\n")
    return path.read_text().strip()


def _create_once(path: Path, text: str) -> None:
    """Write `path` whole, unless it exists. Workers start together and each makes the
    development secret: the file appears at once with all of its text (a hard link of a
    finished file; one that exists is never replaced), so every worker reads the one
    that won, never another's half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    handle = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another worker's came first: it is the secret
        except OSError:
            # a file system without hard links: moved into place (racy there alone)
            if not path.exists():
                os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)
