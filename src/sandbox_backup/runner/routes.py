"""Sandbox and backup paths of the Daytona runner API (Swagger 2.0, v0) that the agent serves."""

from __future__ import annotations

import logging
from typing import Annotated

import fastapi

import sandbox_backup
from sandbox_backup.domain.reference import parse_reference, validate_sandbox_id
from sandbox_backup.runner.auth import require_token
from sandbox_backup.runner.container_state import sandbox_state
from sandbox_backup.runner.context import RunnerContext, runner_context
from sandbox_backup.runner.engine import SANDBOX_ID_LABEL, ContainerSpec, ContainerView
from sandbox_backup.runner.failures import ContainerNotFound
from sandbox_backup.runner.http_errors import ApiError
from sandbox_backup.runner.models import (
    CreateBackupRequest,
    CreateSandboxRequest,
    CreateSandboxResponse,
    ErrorResponse,
    RunnerBackupState,
    RunnerSandboxState,
    SandboxInfo,
)
from sandbox_backup.runner.snapshot_target import validate_snapshot_target

logger = logging.getLogger(__name__)

# Version string that the Daytona API calls daemonVersion: here, the agent's version.
DAEMON_VERSION = sandbox_backup.__version__

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 500, 502, 503)}

router = fastapi.APIRouter(dependencies=[fastapi.Depends(require_token)], responses=_ERRORS)

Context = Annotated[RunnerContext, fastapi.Depends(runner_context)]
SandboxId = Annotated[str, fastapi.Path(alias="sandboxId")]


@router.get("/sandboxes/{sandboxId}", response_model=SandboxInfo, response_model_exclude_none=True)
async def get_sandbox(sandbox_id: SandboxId, context: Context) -> SandboxInfo:
    """Return the container state and the backup state of a sandbox."""
    validate_sandbox_id(sandbox_id)
    container = await context.engine.find_container(sandbox_id)
    record = context.store.get(sandbox_id)
    if container is None and record is None:
        raise ContainerNotFound(f"sandbox {sandbox_id!r} has no container and no backup on this runner")

    state = sandbox_state(container.status, container.exit_code) if container else RunnerSandboxState.DESTROYED
    daemon_version = DAEMON_VERSION if container else None
    if record is None:
        return SandboxInfo(state=state, backup_state=RunnerBackupState.NONE, daemon_version=daemon_version)
    return SandboxInfo(
        state=state,
        backup_state=record.state,
        backup_snapshot=record.snapshot,
        backup_error=record.error,
        recoverable=record.recoverable,
        daemon_version=daemon_version,
        backup_digest=record.digest,
        backup_size_bytes=record.size_bytes,
        backup_layer_count=record.layer_count,
    )


@router.post("/sandboxes/{sandboxId}/backup", status_code=201, response_model=str)
async def create_backup(sandbox_id: SandboxId, body: CreateBackupRequest, context: Context) -> str:
    """Start a backup of the sandbox to `body.snapshot`; the result shows in GET /sandboxes/{sandboxId}."""
    validate_sandbox_id(sandbox_id)
    await context.jobs.request_backup(sandbox_id, body)
    return "Backup started"


@router.post("/sandboxes", status_code=201, response_model=CreateSandboxResponse)
async def create_sandbox(body: CreateSandboxRequest, context: Context) -> CreateSandboxResponse:
    """Pull the snapshot (with the request's registry credentials) and create the sandbox's container."""
    validate_sandbox_id(body.id)
    extra = {"action": "create_sandbox", "sandbox_id": body.id, "snapshot": body.snapshot}
    if body.registry is not None:
        validate_snapshot_target(body.snapshot, body.registry.url, for_push=False)
    else:
        parse_reference(body.snapshot)

    if await context.engine.find_container(body.id) is not None:
        raise ApiError(409, f"a container named {body.id!r} already exists on this runner", code="CONFLICT")
    await _ensure_image(context, body)

    labels = {context.settings.container_label: "true", SANDBOX_ID_LABEL: body.id}
    spec = ContainerSpec(
        name=body.id,
        image=body.snapshot,
        labels=labels,
        entrypoint=body.entrypoint,
        environment=body.env,
        network_mode=context.settings.network_mode,
    )
    await context.engine.create_container(spec, start=not body.skip_start)
    logger.info("sandbox %s created from %s", body.id, body.snapshot, extra=extra)
    return CreateSandboxResponse(daemon_version=DAEMON_VERSION)


@router.post("/sandboxes/{sandboxId}/destroy", response_model=str)
async def destroy_sandbox(sandbox_id: SandboxId, context: Context) -> str:
    """Remove the sandbox's container by force; succeed when it is already gone."""
    validate_sandbox_id(sandbox_id)
    container = await context.engine.find_container(sandbox_id)
    if container is not None:
        await context.engine.remove_container(container.id)
        logger.info("sandbox %s destroyed", sandbox_id, extra={"action": "destroy_sandbox", "sandbox_id": sandbox_id})
    return "Sandbox destroyed"


@router.post("/sandboxes/{sandboxId}/stop", response_model=str)
async def stop_sandbox(sandbox_id: SandboxId, context: Context) -> str:
    container = await _require_container(context, sandbox_id)
    await context.engine.stop_container(container.id)
    logger.info("sandbox %s stopped", sandbox_id, extra={"action": "stop_sandbox", "sandbox_id": sandbox_id})
    return "Sandbox stopped"


@router.post("/sandboxes/{sandboxId}/start", response_model=str)
async def start_sandbox(sandbox_id: SandboxId, context: Context) -> str:
    container = await _require_container(context, sandbox_id)
    await context.engine.start_container(container.id)
    logger.info("sandbox %s started", sandbox_id, extra={"action": "start_sandbox", "sandbox_id": sandbox_id})
    return "Sandbox started"


async def _require_container(context: RunnerContext, sandbox_id: str) -> ContainerView:
    validate_sandbox_id(sandbox_id)
    container = await context.engine.find_container(sandbox_id)
    if container is None:
        raise ContainerNotFound(f"no container managed by this runner is named {sandbox_id!r}")
    return container


async def _ensure_image(context: RunnerContext, body: CreateSandboxRequest) -> None:
    # With registry credentials the snapshot is always pulled, so a backup that was
    # re-pushed under the same tag is fetched anew. Without them, a local image is used.
    if body.registry is None and await context.engine.image_exists(body.snapshot):
        return
    auth_config = body.registry.auth_config() if body.registry else None
    await context.engine.pull(body.snapshot, auth_config)
