"""Manager settings: environment variables `SANDBOX_BACKUP_*`, a TOML file, then defaults.

The TOML file is named by `SANDBOX_BACKUP_CONFIG_FILE` (default: none). Environment variables win
over the file. Every interval, batch size, cap, timeout and retry setting is validated at start,
and a value out of range fails with the key and the allowed range in the message.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tomllib
import typing
import urllib.parse
from typing import Any

import pydantic
import pydantic_settings

ENV_PREFIX = "SANDBOX_BACKUP_"
CONFIG_FILE_ENV = "SANDBOX_BACKUP_CONFIG_FILE"


class Settings(pydantic_settings.BaseSettings):
    """Effective configuration of a manager replica."""

    model_config = pydantic_settings.SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Storage and coordination.
    data_dir: pathlib.Path = pydantic.Field(pathlib.Path("data"), description="Folder for the SQLite file and local state.")
    database_url: str | None = pydantic.Field(None, description="SQLAlchemy URL; empty means SQLite in data_dir. postgresql:// URLs use asyncpg.")
    database_pre_ping: bool = pydantic.Field(
        False,
        description="Test a pooled PostgreSQL connection with a round trip before each transaction. Off, a server restart fails one operation and the pool is then replaced.",
    )
    coordination_url: str | None = pydantic.Field(None, description="redis://... for locks shared by replicas; empty means in-process locks.")

    # REST API.
    api_host: str = pydantic.Field("127.0.0.1", description="Address the manager API binds to.")
    api_port: int = pydantic.Field(8200, ge=1, le=65535, description="Port of the manager API.")
    api_token: pydantic.SecretStr = pydantic.Field(pydantic.SecretStr(""), description="Admin bearer token, allowed on every API call. `serve` exits with an error when it is empty.")
    api_read_token: pydantic.SecretStr | None = pydantic.Field(
        None, description="Read-only bearer token, allowed only on GET calls under /api/v1. Unset means no read-only token is accepted."
    )
    event_loop: typing.Literal["auto", "uvloop", "asyncio"] = pydantic.Field(
        "auto", description="Event loop of `serve`: uvloop (auto, when installed) spends less CPU per request and per database call than asyncio's own."
    )
    http_parser: typing.Literal["auto", "httptools", "h11"] = pydantic.Field(
        "auto", description="HTTP parser of the API server: httptools (auto, when installed) or the pure-Python h11."
    )

    # Schedule.
    backup_interval_s: float = pydantic.Field(3600.0, ge=60, le=30 * 86400, description="A running sandbox is due when its last completed backup is older than this.")
    due_check_interval_s: float = pydantic.Field(60.0, ge=1, le=86400, description="How often running sandboxes are checked for a due backup.")
    stopped_check_interval_s: float = pydantic.Field(10.0, ge=1, le=3600, description="How often stopped and archiving sandboxes are checked.")
    due_check_batch: int = pydantic.Field(1000, ge=1, le=100_000, description="Sandboxes queued per due-check pass.")

    # Dispatch and tracking.
    dispatch_interval_s: float = pydantic.Field(2.0, ge=0.1, le=600, description="How often PENDING attempts are sent to runners (events also wake the dispatcher at once).")
    dispatch_batch: int = pydantic.Field(1000, ge=1, le=100_000, description="Attempts dispatched per pass, across all runners.")
    max_concurrent_backups_per_runner: int = pydantic.Field(6, ge=1, le=1000, description="Default cap of attempts in flight on one runner; a runner's own setting wins.")
    runner_call_concurrency: int = pydantic.Field(64, ge=1, le=4096, description="HTTP calls to runners in flight at once from one manager.")
    progress_interval_s: float = pydantic.Field(10.0, ge=0.5, le=3600, description="How often IN_PROGRESS attempts are checked on their runner.")
    progress_check_after_s: float = pydantic.Field(
        120.0,
        ge=0,
        le=86400,
        description="An IN_PROGRESS attempt is asked about on its runner only after nothing was heard of it for this long; runner reports end most attempts before.",
    )
    progress_batch: int = pydantic.Field(500, ge=1, le=100_000, description="Attempts checked per progress pass.")
    attempt_deadline_s: float = pydantic.Field(7200.0, ge=60, le=7 * 86400, description="An attempt still IN_PROGRESS after this is failed as timed out.")
    unknown_attempt_grace_s: float = pydantic.Field(30.0, ge=0, le=3600, description="How long after dispatch a runner may still not know an attempt before it counts as lost.")
    runner_timeout_s: float = pydantic.Field(30.0, ge=1, le=3600, description="Timeout of one HTTP call to a runner.")
    runner_health_interval_s: float = pydantic.Field(15.0, ge=1, le=3600, description="How often runners are probed.")
    runner_unresponsive_after: int = pydantic.Field(3, ge=1, le=100, description="Failed probes in a row before a READY runner becomes UNRESPONSIVE.")
    registry_timeout_s: float = pydantic.Field(10.0, ge=1, le=600, description="Timeout of one HTTP call to a registry.")

    # Retries.
    retry_max_attempts: int = pydantic.Field(5, ge=1, le=100, description="Attempts per backup before it ends in ERROR.")
    retry_base_delay_s: float = pydantic.Field(30.0, ge=0, le=86400, description="Delay before the first retry; doubles with each attempt.")
    retry_max_delay_s: float = pydantic.Field(3600.0, ge=0, le=7 * 86400, description="Upper bound of the retry delay.")
    retry_jitter: float = pydantic.Field(0.2, ge=0, le=1, description="Fraction of the delay added or removed at random, so retries of many sandboxes spread out.")

    # Restore.
    restore_batch: int = pydantic.Field(20, ge=1, le=10_000, description="Restores carried out per pass of the restore job.")
    restore_interval_s: float = pydantic.Field(5.0, ge=0.1, le=3600, description="How often open restores are looked at (requests also wake the job at once).")
    restore_timeout_s: float = pydantic.Field(1800.0, ge=10, le=86400, description="Timeout of the runner call that pulls and creates a restored sandbox.")
    restore_max_attempts: int = pydantic.Field(6, ge=1, le=100, description="Tries of a restore while the registry or runner cannot be reached, before it fails.")
    archive_interval_s: float = pydantic.Field(10.0, ge=1, le=3600, description="How often archiving sandboxes with a fresh backup are finished.")
    drain_interval_s: float = pydantic.Field(15.0, ge=1, le=3600, description="How often draining runners are worked off.")
    shutdown_grace_s: float = pydantic.Field(30.0, ge=0, le=3600, description="Seconds a stopping manager waits for running job bodies before it cancels them.")

    # Registry cleanup.
    cleanup_interval_s: float = pydantic.Field(30.0, ge=1, le=86400, description="How often owed registry deletions are worked off.")
    cleanup_batch: int = pydantic.Field(100, ge=1, le=10_000, description="Owed deletions handled per pass.")

    # Logs.
    log_level: str = pydantic.Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = pydantic.Field(False, description="Write one JSON object per log line.")

    # Retention and verification.
    # The global retention policy; a sandbox's own `retention_policy` JSON overrides it field by field.
    retention_keep_last: int = pydantic.Field(10, ge=0, le=100_000, description="Newest backups of each sandbox that are kept.")
    retention_keep_hourly: int = pydantic.Field(48, ge=0, le=100_000, description="Most recent UTC hours with a backup whose newest backup is kept.")
    retention_keep_daily: int = pydantic.Field(7, ge=0, le=100_000, description="Most recent UTC days with a backup whose newest backup is kept.")
    retention_keep_weekly: int = pydantic.Field(4, ge=0, le=100_000, description="Most recent ISO weeks with a backup whose newest backup is kept.")
    retention_keep_monthly: int = pydantic.Field(24, ge=0, le=100_000, description="Most recent UTC months with a backup whose newest backup is kept.")
    retention_min_verified: int = pydantic.Field(3, ge=0, le=100_000, description="Newest verified, unbroken backups of each sandbox that are never deleted.")
    retention_interval_s: float = pydantic.Field(3600.0, ge=60, le=7 * 86400, description="How often the retention policy prunes old backups.")
    retention_batch: int = pydantic.Field(500, ge=1, le=100_000, description="Sandboxes read per page while pruning.")
    verify_interval_s: float = pydantic.Field(3600.0, ge=10, le=7 * 86400, description="How often backups due for verification are checked in the registry.")
    verify_batch: int = pydantic.Field(100, ge=1, le=10_000, description="Backups checked in the registry per verification pass.")
    verify_max_age_s: float = pydantic.Field(86400.0, ge=60, le=365 * 86400, description="A backup is checked again once its last successful verification is older than this.")

    @pydantic.field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level {value!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return level

    @pydantic.model_validator(mode="after")
    def _check_delays(self) -> Settings:
        if self.retry_max_delay_s < self.retry_base_delay_s:
            raise ValueError(
                f"retry_max_delay_s ({self.retry_max_delay_s}) must be at least retry_base_delay_s ({self.retry_base_delay_s})"
            )
        # An equal read token would be matched as the admin token, so the read-only limit would never apply.
        read_token = self.api_read_token.get_secret_value() if self.api_read_token else ""
        if read_token and read_token == self.api_token.get_secret_value():
            raise ValueError("api_read_token must differ from api_token. Set a different read-only token.")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        return env_then_toml(settings_cls, init_settings, env_settings, config_file_env=CONFIG_FILE_ENV)

    def effective_database_url(self) -> str:
        """Return the async SQLAlchemy URL: the configured one, or SQLite inside data_dir."""
        if not self.database_url:
            return f"sqlite+aiosqlite:///{self.data_dir / 'sandbox-backup.db'}"
        return to_async_url(self.database_url)


def env_then_toml(
    settings_cls: type[pydantic_settings.BaseSettings],
    init_settings: pydantic_settings.PydanticBaseSettingsSource,
    env_settings: pydantic_settings.PydanticBaseSettingsSource,
    *,
    config_file_env: str,
) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
    """Return the setting sources in order of precedence: arguments, environment, then the TOML
    file named by the environment variable `config_file_env` when it is set."""
    sources: list[pydantic_settings.PydanticBaseSettingsSource] = [init_settings, env_settings]
    config_file = os.environ.get(config_file_env)
    if config_file:
        sources.append(pydantic_settings.TomlConfigSettingsSource(settings_cls, toml_file=config_file))
    return tuple(sources)


def to_async_url(url: str) -> str:
    """Map plain `postgresql://` and `sqlite://` URLs to their asyncio drivers."""
    for plain, async_prefix in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return async_prefix + url[len(plain):]
    return url


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and the TOML file, raising a readable error on bad values."""
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


class ConfigError(ValueError):
    """A setting is missing or out of range."""


def format_validation_error(exc: pydantic.ValidationError) -> str:
    """Turn a pydantic error into lines of `SANDBOX_BACKUP_KEY: problem`."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        env_name = ENV_PREFIX + key.upper()
        lines.append(f"{env_name} ({key}): {error['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


MASK = "********"
# Settings whose URL may carry a password, as in postgresql://user:password@host/db.
URL_SETTINGS = ("database_url", "coordination_url")


@dataclasses.dataclass(frozen=True)
class SettingView:
    """One setting as `config show` prints it: `value` is JSON-compatible, and a set secret is MASK."""

    name: str
    env_name: str
    value: Any
    source: str  # "env", "file" or "default"
    secret: bool


def describe_settings() -> list[SettingView]:
    """Load the settings and record for each one whether the environment, the TOML file or the default set it.

    The source follows the precedence of `Settings`: an environment variable wins over the file.
    Passwords inside database_url and coordination_url are masked too. Raises ConfigError when a
    value is invalid or the TOML file cannot be parsed.
    """
    config_file = os.environ.get(CONFIG_FILE_ENV)
    file_values = _read_config_file(config_file) if config_file else {}
    settings = load_settings()
    values = settings.model_dump(mode="json")
    # pydantic-settings matches environment variable names case-insensitively by default.
    env_names = {name.lower() for name in os.environ}
    file_keys = {key.lower() for key in file_values}

    views = []
    for name, field in Settings.model_fields.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name.lower() in env_names:
            source = "env"
        elif name in file_keys:
            source = "file"
        else:
            source = "default"
        secret = _is_secret(field.annotation)
        value = values[name]
        if secret:
            raw = getattr(settings, name)
            value = MASK if raw is not None and raw.get_secret_value() else None
        elif name in URL_SETTINGS and value:
            value = mask_url_password(value)
        views.append(SettingView(name=name, env_name=env_name, value=value, source=source, secret=secret))
    return views


def _read_config_file(path: str) -> dict[str, Any]:
    # Like pydantic-settings, a missing file contributes nothing.
    file_path = pathlib.Path(path)
    if not file_path.is_file():
        return {}
    try:
        with file_path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid configuration:\n  {CONFIG_FILE_ENV} ({path}): invalid TOML ({exc}). Fix the file or unset {CONFIG_FILE_ENV}.") from exc


def _is_secret(annotation: Any) -> bool:
    return annotation is pydantic.SecretStr or pydantic.SecretStr in typing.get_args(annotation)


def mask_url_password(url: str) -> str:
    """Replace the password of a URL such as redis://:secret@host:6379/0 with MASK."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))
