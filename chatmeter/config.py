"""Settings, read once at start-up. The only module that reads the environment."""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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

ENV_PREFIX = "CHATMETER_"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."
DEV_SECRET_FILE = ".chatmeter/dev-jwt-secret"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


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
    timeout_seconds: float = Field(default=60.0, gt=0)
    # scripted provider only
    reply: str = "Hello from the scripted model."
    chunks: int = Field(default=4, ge=1, le=100_000)
    delay_ms: float = Field(default=0.0, ge=0)
    # usage reporting of the scripted provider: "last" chunk, "none" (forces counting)
    usage: Literal["last", "none"] = "last"
    # local provider only
    model_path: str | None = None
    threads: int = Field(default=2, ge=1, le=256)
    parallel: int = Field(default=4, ge=1, le=64)


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
    default_token_limit: int = Field(default=100_000, ge=0)
    history_messages: int = Field(default=10, ge=0, le=1000)
    max_message_chars: int = Field(default=5000, ge=1, le=1_000_000)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # a request (head and body) must arrive within this of the connection being ready
    request_read_timeout_seconds: float = Field(default=20.0, gt=0)
    # before default_model, which is checked against it
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    default_model: str = "local"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    ping_interval_seconds: float = Field(default=15.0, gt=0)
    provider_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    reservation_ttl_seconds: float = Field(default=120.0, gt=0)
    settle_retry_seconds: float = Field(default=10.0, ge=0)
    outbox_dir: str = ".chatmeter/outbox"
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    count_cache_size: int = Field(default=4096, ge=1)
    log_level: str = "INFO"
    log_content: bool = False

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
        if not value or any(name not in known for name in value):
            raise ValueError(f"each must be one of {', '.join(sorted(known))}")
        return value

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

    @model_validator(mode="after")
    def _with_local_model(self) -> Settings:
        if "local" not in self.models:
            self.models["local"] = _builtin_local()
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def system_prompt_for(self, model_name: str) -> str:
        return self.models[model_name].system_prompt or self.system_prompt


_ENV_FIELDS = {name for name in Settings.model_fields if name != "models"}


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _ENV_FIELDS:
            raise ConfigError(f"unknown setting {key}")
        values[name] = (
            [part.strip() for part in raw.split(",")] if name == "jwt_algorithms" else raw
        )
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
        elif location[0] == "models":
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
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret
