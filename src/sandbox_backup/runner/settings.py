"""Settings of the runner agent: SANDBOX_BACKUP_RUNNER_* environment variables, then the TOML file
named by SANDBOX_BACKUP_RUNNER_CONFIG_FILE, then defaults."""

from __future__ import annotations

import pathlib
import socket

import pydantic
import pydantic_settings

from sandbox_backup import config


RUNNER_CONFIG_FILE_ENV = "SANDBOX_BACKUP_RUNNER_CONFIG_FILE"


class RunnerSettings(pydantic_settings.BaseSettings):
    """Configuration of one runner agent (`sandbox-backup runner serve`)."""

    model_config = pydantic_settings.SettingsConfigDict(env_prefix="SANDBOX_BACKUP_RUNNER_", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        return config.env_then_toml(settings_cls, init_settings, env_settings, config_file_env=RUNNER_CONFIG_FILE_ENV)

    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=8300, ge=1, le=65535)
    token: pydantic.SecretStr = pydantic.Field(
        description="Bearer token that every API request must carry; the agent also sends it with its reports."
    )
    runner_id: str = pydantic.Field(
        default_factory=socket.gethostname,
        description="Id of this runner in the manager; used in the report URL.",
    )
    docker_host: str = pydantic.Field(
        default="unix:///var/run/docker.sock",
        description="Docker Engine API endpoint (Docker or Podman's Docker-compatible service).",
    )
    state_path: pathlib.Path = pydantic.Field(
        default=pathlib.Path("runner-state.sqlite3"),
        description="SQLite file that keeps the backup state of each sandbox across restarts.",
    )
    pause_on_commit: bool = pydantic.Field(
        default=True, description="Pause the container while it is committed, so the image is consistent."
    )
    backup_timeout_s: float = pydantic.Field(
        default=3600.0, gt=0, description="Maximum time in seconds for one backup attempt (commit and push)."
    )
    shutdown_grace_s: float = pydantic.Field(
        default=30.0,
        ge=0,
        description=(
            "Seconds a stopping agent lets running backups finish before it aborts them;"
            " new backup requests get 503 meanwhile."
        ),
    )
    flatten_threshold_layers: int = pydantic.Field(
        default=100,
        ge=2,
        le=125,
        description=(
            "Maximum number of layers of a pushed backup image: a committed image with more layers is"
            " flattened into one layer before the push, which keeps restored sandboxes below the"
            " overlay driver's layer limit."
        ),
    )
    manager_url: str | None = pydantic.Field(
        default=None, description="Base URL of the manager that receives backup reports; no reports when unset."
    )
    report_retries: int = pydantic.Field(
        default=5, ge=0, description="Number of retries of a failed report before the agent gives up on it."
    )
    report_backoff_s: float = pydantic.Field(
        default=1.0, ge=0, description="Delay in seconds before the first report retry; doubles on each retry."
    )
    network_mode: str | None = pydantic.Field(
        default=None,
        description="Network mode of the containers the agent creates, such as 'none'; the engine's default if unset.",
    )
    container_label: str = pydantic.Field(
        default="sandbox-backup.managed", description="Label set to 'true' on every container the agent creates."
    )
    report_containers: bool = pydantic.Field(
        default=True,
        description=(
            "Send the manager the containers that carry container_label and their state changes, so it "
            "learns sandboxes without a platform; needs manager_url."
        ),
    )
    default_organization_id: str | None = pydantic.Field(
        default="default",
        description=(
            "Organization of a reported container without a sandbox-backup.organization-id label; "
            "unset or empty reports none, which makes a new sandbox a warm-pool sandbox that is never backed up."
        ),
    )
    inventory_interval_s: float = pydantic.Field(
        default=300.0,
        gt=0,
        description="Seconds between two full container inventories sent to the manager, besides the one after each connect.",
    )
    event_reconnect_backoff_s: float = pydantic.Field(
        default=1.0,
        gt=0,
        description="Delay in seconds before reconnecting to the engine's event stream; doubles on each failure up to 30 s.",
    )
