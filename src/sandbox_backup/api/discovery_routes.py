"""Discovery endpoints of the manager API: runner agents report the containers they manage.

Both endpoints authenticate the calling runner with its own token, like the report endpoint:
`Authorization: Bearer <runner token>`. An unknown runner or a wrong token gets 401.
"""

from __future__ import annotations

from typing import Annotated, Literal

import fastapi
import pydantic

from sandbox_backup.api.schemas import ApiModel
from sandbox_backup.domain.states import SandboxState
from sandbox_backup.manager import discovery
from sandbox_backup.manager.service import BackupManager

_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {401: {"description": "Unknown runner or wrong runner token."}}


class DiscoveredSandboxIn(ApiModel):
    """One managed container; its name is the sandbox id."""

    sandbox_id: str = pydantic.Field(description="Container name. An id that cannot form an image reference is skipped.")
    state: Literal["STARTED", "STOPPED"]
    organization_id: str | None = pydantic.Field(None, description="Used only when the sandbox is new; empty means a warm-pool sandbox.")
    ephemeral: bool = pydantic.Field(False, description="Used only when the sandbox is new; an ephemeral sandbox is never backed up.")
    labels: dict[str, str] | None = pydantic.Field(None, description="The container's sandbox-backup.* labels; accepted but not stored.")


class InventoryIn(ApiModel):
    sandboxes: list[DiscoveredSandboxIn] = pydantic.Field(description="Every container on the runner that carries the agent's label.")


class SandboxEventIn(ApiModel):
    sandbox_id: str
    event: discovery.ContainerEvent
    organization_id: str | None = pydantic.Field(None, description="Used only when a started or stopped sandbox is new.")
    ephemeral: bool = False
    labels: dict[str, str] | None = None


class SkippedSandboxOut(ApiModel):
    sandbox_id: str
    reason: str


class DiscoveryOut(ApiModel):
    recorded: list[str] = pydantic.Field(description="Sandbox ids that now match what the runner reported.")
    skipped: list[SkippedSandboxOut] = pydantic.Field(description="Sandbox ids left unchanged, with the reason.")


def create_router(manager: BackupManager) -> fastapi.APIRouter:
    """Build the router of `PUT .../sandboxes` and `POST .../sandbox-events` under /api/v1/runners/{runner_id}."""
    ctx = manager.ctx

    async def require_runner_token(runner_id: str, authorization: Annotated[str | None, fastapi.Header()] = None) -> None:
        await discovery.authenticate_runner(ctx, runner_id, _bearer_token(authorization))

    router = fastapi.APIRouter(
        prefix="/api/v1", tags=["discovery"], responses=_ERROR_RESPONSES, dependencies=[fastapi.Depends(require_runner_token)]
    )

    @router.put("/runners/{runner_id}/sandboxes", response_model=DiscoveryOut)
    async def put_inventory(runner_id: str, body: InventoryIn) -> DiscoveryOut:
        """Record every managed container of the runner. Sandboxes missing from the list are left as they are."""
        observed = [_observed(item.sandbox_id, SandboxState(item.state), item.organization_id, item.ephemeral) for item in body.sandboxes]
        return _result_out(await discovery.apply_inventory(ctx, runner_id, observed))

    @router.post("/runners/{runner_id}/sandbox-events", response_model=DiscoveryOut)
    async def post_sandbox_event(runner_id: str, body: SandboxEventIn) -> DiscoveryOut:
        """Apply one container state change: started, stopped (queues a backup) or destroyed (deletes the backups)."""
        # apply_event takes the state from the event, so STOPPED here only fills the field.
        observed = _observed(body.sandbox_id, SandboxState.STOPPED, body.organization_id, body.ephemeral)
        return _result_out(await discovery.apply_event(ctx, runner_id, body.event, observed))

    return router


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _observed(sandbox_id: str, state: SandboxState, organization_id: str | None, ephemeral: bool) -> discovery.ObservedSandbox:
    return discovery.ObservedSandbox(sandbox_id=sandbox_id, state=state, organization_id=organization_id, ephemeral=ephemeral)


def _result_out(result: discovery.DiscoveryResult) -> DiscoveryOut:
    skipped = [SkippedSandboxOut(sandbox_id=skip.sandbox_id, reason=skip.reason) for skip in result.skipped]
    return DiscoveryOut(recorded=result.recorded, skipped=skipped)
