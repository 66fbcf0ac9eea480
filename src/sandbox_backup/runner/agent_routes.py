"""The agent's own paths under /agent/, outside the Daytona runner API."""

from __future__ import annotations

import logging
from typing import Annotated

import fastapi
from fastapi.responses import JSONResponse

from sandbox_backup import errors
from sandbox_backup.runner.auth import require_token
from sandbox_backup.runner.container_state import sandbox_state
from sandbox_backup.runner.context import RunnerContext, runner_context
from sandbox_backup.runner.models import AgentHealth, ManagedSandbox, RunnerBackupState

logger = logging.getLogger(__name__)

router = fastapi.APIRouter(prefix="/agent")

Context = Annotated[RunnerContext, fastapi.Depends(runner_context)]


@router.get("/health", response_model=AgentHealth, responses={503: {"model": AgentHealth}})
async def health(context: Context) -> JSONResponse:
    """Report whether the agent reaches its engine: 200 if it does, 503 if not. Needs no token."""
    reachable = await context.engine.ping()
    version = None
    if reachable:
        try:
            version = await context.engine.version()
        except errors.EngineError as exc:
            reachable = False
            logger.warning("engine version request failed: %s", exc, extra={"action": "health"})
    body = AgentHealth(
        status="ok" if reachable else "engine unreachable",
        engine_reachable=reachable,
        engine_version=version,
        runner_id=context.settings.runner_id,
    )
    return JSONResponse(status_code=200 if reachable else 503, content=body.to_json_dict())


@router.get(
    "/sandboxes",
    response_model=list[ManagedSandbox],
    response_model_exclude_none=True,
    dependencies=[fastapi.Depends(require_token)],
)
async def list_sandboxes(context: Context) -> list[ManagedSandbox]:
    """List the containers that carry the agent's label, with their backup state."""
    containers = await context.engine.list_managed()
    records = {record.sandbox_id: record for record in context.store.list_all()}
    sandboxes = []
    for container in sorted(containers, key=lambda container: container.name):
        record = records.get(container.name)
        sandboxes.append(
            ManagedSandbox(
                id=container.name,
                state=sandbox_state(container.status, container.exit_code),
                backup_state=record.state if record else RunnerBackupState.NONE,
                backup_snapshot=record.snapshot if record else None,
            )
        )
    return sandboxes
