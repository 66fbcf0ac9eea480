"""Server commands: the manager (`serve`), the runner agent (`runner serve`) and both (`up`)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Annotated

import pydantic
import typer

from sandbox_backup import logs, servers
from sandbox_backup.api.app import create_app
from sandbox_backup.config import ConfigError, Settings, format_validation_error, load_settings
from sandbox_backup.manager.service import BackupManager, open_manager
from sandbox_backup.runner import app as runner_app
from sandbox_backup.runner.settings import RunnerSettings
from sandbox_backup.store import fleet

logger = logging.getLogger(__name__)

LOCAL_RUNNER_ID = "local"
LOCAL_REGISTRY_ID = "local"


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def _runner_settings(**defaults: object) -> RunnerSettings:
    # Environment variables win over the defaults that `up` derives from the manager settings.
    overrides = {key: value for key, value in defaults.items() if f"SANDBOX_BACKUP_RUNNER_{key.upper()}" not in os.environ}
    try:
        return RunnerSettings(**overrides)
    except pydantic.ValidationError as exc:
        typer.echo(format_validation_error(exc).replace("SANDBOX_BACKUP_", "SANDBOX_BACKUP_RUNNER_"), err=True)
        raise typer.Exit(2) from exc


def serve() -> None:
    """Run a manager replica: periodic jobs plus the REST API (settings from SANDBOX_BACKUP_*)."""
    settings = _settings()
    logs.configure(settings.log_level, json_lines=settings.log_json)
    if not settings.api_token.get_secret_value():
        typer.echo("SANDBOX_BACKUP_API_TOKEN (api_token): missing; set the bearer token the API requires", err=True)
        raise typer.Exit(2)
    servers.run(_serve_manager(settings), settings.event_loop)


async def _serve_manager(settings: Settings, *extra_servers: servers.EmbeddedServer, on_ready=None, drain_extra=None) -> None:  # type: ignore[no-untyped-def]
    manager = await open_manager(settings)
    try:
        if on_ready is not None:
            await on_ready(manager)
        await manager.start()
        app = servers.RejectWritesWhileDraining(create_app(manager), lambda: manager.draining)
        api_server = servers.make_server(app, host=settings.api_host, port=settings.api_port, http_parser=settings.http_parser)
        logger.info("manager API listening", extra={"action": "api_listening", "url": f"http://{settings.api_host}:{settings.api_port}"})

        async def drain() -> None:
            # The API keeps serving reads (and rejecting writes) until the jobs have drained.
            if drain_extra is None:
                await manager.stop()
            else:
                await asyncio.gather(manager.stop(), drain_extra())

        await servers.serve_all(api_server, *extra_servers, before_exit=drain)
    finally:
        await manager.aclose()


def runner_serve() -> None:
    """Run the runner agent of this node (settings from SANDBOX_BACKUP_RUNNER_*)."""
    settings = _runner_settings()
    logs.configure(os.environ.get("SANDBOX_BACKUP_LOG_LEVEL", "INFO").upper(), json_lines=os.environ.get("SANDBOX_BACKUP_LOG_JSON", "").lower() in ("1", "true"))
    runner_app.serve(settings)


def up(
    registry_url: Annotated[str, typer.Option(envvar="SANDBOX_BACKUP_REGISTRY_URL", help="Registry that receives the backups, e.g. http://127.0.0.1:5000.")],
    registry_username: Annotated[str, typer.Option(envvar="SANDBOX_BACKUP_REGISTRY_USERNAME", help="Registry user name; empty for none.")] = "",
    registry_password: Annotated[str, typer.Option(envvar="SANDBOX_BACKUP_REGISTRY_PASSWORD", help="Registry password (prefer the environment variable).", show_default=False)] = "",
    registry_project: Annotated[str, typer.Option(envvar="SANDBOX_BACKUP_REGISTRY_PROJECT", help="Path prefix of the backup repositories.")] = "sandbox-backup",
    runner_port: Annotated[int, typer.Option(envvar="SANDBOX_BACKUP_RUNNER_PORT", help="Port of the embedded runner agent.")] = 8300,
) -> None:
    """Run a manager and a runner agent for the local engine in one process (SQLite, in-process locks)."""
    settings = _settings()
    logs.configure(settings.log_level, json_lines=settings.log_json)
    if not settings.api_token.get_secret_value():
        settings = settings.model_copy(update={"api_token": pydantic.SecretStr(secrets.token_urlsafe(24))})
        logger.warning("SANDBOX_BACKUP_API_TOKEN is not set; generated a token for this run only", extra={"action": "api_token_generated"})

    runner_settings = _runner_settings(
        token=secrets.token_urlsafe(24),
        runner_id=LOCAL_RUNNER_ID,
        port=runner_port,
        state_path=settings.data_dir / "runner-state.sqlite3",
        manager_url=f"http://{settings.api_host}:{settings.api_port}",
    )
    runner_server = servers.make_server(runner_app.create_app(runner_settings), host=runner_settings.host, port=runner_settings.port)

    async def register_local_parts(manager: BackupManager) -> None:
        ctx = manager.ctx
        async with ctx.db.transaction() as session:
            await fleet.upsert_runner(
                session,
                runner_id=runner_settings.runner_id,
                api_url=f"http://{runner_settings.host}:{runner_settings.port}",
                token=runner_settings.token.get_secret_value(),
                now=ctx.now(),
            )
            await fleet.upsert_registry(
                session,
                registry_id=LOCAL_REGISTRY_ID,
                url=registry_url.rstrip("/"),
                now=ctx.now(),
                project=registry_project or None,
                username=registry_username or None,
                password=registry_password or None,
                is_default=True,
            )
        logger.info("local runner and registry registered", extra={"action": "local_parts_registered", "runner_id": runner_settings.runner_id, "registry_url": registry_url})

    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def drain_runner() -> None:
        await runner_app.drain_backups(runner_server.config.app)

    servers.run(_serve_manager(settings, runner_server, on_ready=register_local_parts, drain_extra=drain_runner), settings.event_loop)
