"""FastAPI app of the runner agent (`sandbox-backup runner serve`) and its uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import fastapi
import fastapi.responses

import sandbox_backup
from sandbox_backup import servers
from sandbox_backup.runner import agent_routes, routes
from sandbox_backup.runner import metrics as runner_metrics
from sandbox_backup.runner.backup import AgentShuttingDown, BackupJobs
from sandbox_backup.runner.context import RunnerContext
from sandbox_backup.runner.discovery import SandboxDiscovery
from sandbox_backup.runner.engine import DockerEngine
from sandbox_backup.runner.http_errors import error_response, install_error_handlers
from sandbox_backup.runner.reporter import Reporter
from sandbox_backup.runner.settings import RunnerSettings
from sandbox_backup.runner.state import BackupStateStore

logger = logging.getLogger(__name__)


def create_app(settings: RunnerSettings, *, engine: DockerEngine | None = None) -> fastapi.FastAPI:
    """Build the agent app. The state store, reporter and engine open when the app starts.

    An `engine` passed in stays open after the app stops; one the app creates from
    `settings.docker_host` is closed with it.
    """
    # Created with the app, not in the lifespan, so /metrics answers even before the engine opens.
    metrics = runner_metrics.RunnerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
        owned_engine = engine is None
        active_engine = engine or DockerEngine(
            settings.docker_host,
            container_label=settings.container_label,
            transfer_timeout_s=settings.backup_timeout_s,
        )
        store = BackupStateStore(settings.state_path)
        reporter = _make_reporter(settings)
        jobs = BackupJobs(
            active_engine,
            store,
            reporter,
            pause_on_commit=settings.pause_on_commit,
            timeout_s=settings.backup_timeout_s,
            flatten_threshold_layers=settings.flatten_threshold_layers,
            metrics=metrics,
            shutdown_grace_s=settings.shutdown_grace_s,
        )
        app.state.runner = RunnerContext(settings=settings, engine=active_engine, store=store, jobs=jobs)
        jobs.recover_interrupted()
        discovery = SandboxDiscovery(settings, active_engine) if settings.manager_url and settings.report_containers else None
        if discovery is not None:
            discovery.start()
        logger.info(
            "runner agent %s started on engine %s",
            settings.runner_id,
            settings.docker_host,
            extra={"action": "agent_start", "runner_id": settings.runner_id},
        )
        try:
            yield
        finally:
            if discovery is not None:
                await discovery.aclose()
            await jobs.aclose()
            if reporter is not None:
                await reporter.aclose()
            store.close()
            if owned_engine:
                active_engine.close()
            logger.info("runner agent %s stopped", settings.runner_id, extra={"action": "agent_stop"})

    app = fastapi.FastAPI(
        title="sandbox-backup runner agent",
        version=sandbox_backup.__version__,
        description="Backup-related part of the Daytona runner API, served for one container engine.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_exception_handler(AgentShuttingDown, _shutting_down)
    app.include_router(routes.router)
    app.include_router(agent_routes.router)

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> fastapi.Response:
        return fastapi.Response(metrics.render(), media_type=runner_metrics.CONTENT_TYPE)

    return app


def serve(settings: RunnerSettings) -> None:
    """Run the agent with uvicorn on `settings.host:settings.port` until SIGINT or SIGTERM.

    On the signal the agent first drains its backups while it still serves requests
    (new backups get 503), then stops listening.
    """
    app = create_app(settings)
    server = servers.make_server(app, host=settings.host, port=settings.port)
    asyncio.run(servers.serve_all(server, before_exit=lambda: drain_backups(app)))


async def drain_backups(app: fastapi.FastAPI) -> None:
    """Reject new backups and wait up to `shutdown_grace_s` for running ones; see BackupJobs.drain."""
    context = getattr(app.state, "runner", None)
    if context is not None:
        await context.jobs.drain()


async def _shutting_down(request: fastapi.Request, exc: Exception) -> fastapi.responses.JSONResponse:
    return error_response(request, 503, str(exc), "SHUTTING_DOWN")


def _make_reporter(settings: RunnerSettings) -> Reporter | None:
    if not settings.manager_url:
        return None
    return Reporter(
        settings.manager_url,
        settings.runner_id,
        settings.token,
        retries=settings.report_retries,
        backoff_s=settings.report_backoff_s,
    )
