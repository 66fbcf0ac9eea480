"""Sandboxes that runner agents discover on their engines, for fleets with no platform.

An agent sends the full list of its managed containers (an inventory) and each later state
change (an event). Discovery records only what an agent can observe: that a container exists
on that runner, and whether it runs.

Rules, because the platform and discovery may both describe the same sandbox:
- A new sandbox id is created with the organization and ephemeral flag the agent sends.
- For a known sandbox, discovery changes only `state` and, when the row has none, `runner_id`.
  Organization, region, ephemeral flag and desired state stay as the platform (or the first
  discovery) set them; change them with `PUT /api/v1/sandboxes/{id}`.
- A sandbox recorded on another runner, or in ARCHIVING, ARCHIVED or RESTORING, is skipped:
  an archive removes the container on purpose, and a restore creates it on purpose.
- A DESTROYED sandbox is skipped: the manager never reuses a destroyed sandbox id, because the
  destroy's cleanup deletes every backup in its repository.
- An inventory never destroys a sandbox that it does not list, because the schema cannot tell a
  discovered sandbox from one that a platform registered. Only a `destroyed` event destroys.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import logging

from sqlalchemy import exc as sa_exc

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import SandboxState
from sandbox_backup.manager import lifecycle, tracking
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import fleet, sandboxes
from sandbox_backup.store.models import Sandbox
from sandbox_backup.store.sandboxes import SandboxFields

logger = logging.getLogger(__name__)

# Same limit as the organization_id column of the sandboxes table.
MAX_ORGANIZATION_ID_LENGTH = 128

# How often one observation is applied again after a concurrent change of the same row.
CONFLICT_ATTEMPTS = 3

# States that an observed container can move a known sandbox out of.
OBSERVABLE_STATES = frozenset({SandboxState.STARTED, SandboxState.STOPPED, SandboxState.ERROR})

# Skipped ids listed in the log line of one inventory. The response lists them all.
LOGGED_SKIPS = 20


class ContainerEvent(str, enum.Enum):
    """State change of a container, as the agent names it."""

    STARTED = "started"
    STOPPED = "stopped"
    DESTROYED = "destroyed"


_EVENT_STATES = {ContainerEvent.STARTED: SandboxState.STARTED, ContainerEvent.STOPPED: SandboxState.STOPPED}
_LIFECYCLE_EVENTS = {
    SandboxState.STARTED: lifecycle.LifecycleEvent.STARTED,
    SandboxState.STOPPED: lifecycle.LifecycleEvent.STOPPED,
}


class RunnerTokenRejected(errors.ReportRejected):
    """A discovery request came with an unknown runner id or a token that is not that runner's.

    A subclass of ReportRejected, so the API returns 401 for it, as for a rejected report.
    """


@dataclasses.dataclass(frozen=True)
class ObservedSandbox:
    """One container as an agent observes it. The container name is the sandbox id."""

    sandbox_id: str
    state: SandboxState
    organization_id: str | None = None
    ephemeral: bool = False


@dataclasses.dataclass(frozen=True)
class SkippedSandbox:
    sandbox_id: str
    reason: str


@dataclasses.dataclass
class DiscoveryResult:
    """Sandbox ids recorded (changed or already as observed) and those skipped, with the reason."""

    recorded: list[str] = dataclasses.field(default_factory=list)
    skipped: list[SkippedSandbox] = dataclasses.field(default_factory=list)


class _Skip(Exception):
    """An observation that discovery does not apply. The message is the reason."""


async def authenticate_runner(ctx: ManagerContext, runner_id: str, token: str) -> None:
    """Raise RunnerTokenRejected unless `token` is the registered token of `runner_id`."""
    async with ctx.db.transaction() as session:
        runner = await fleet.get_runner(session, runner_id)
    if runner is None or not hmac.compare_digest(runner.token.encode(), token.encode()):
        raise RunnerTokenRejected(
            f"discovery request for runner {runner_id!r} rejected: unknown runner or wrong token; register the "
            f"runner with PUT /api/v1/runners/{runner_id} and the agent's token"
        )


async def apply_inventory(ctx: ManagerContext, runner_id: str, observed: list[ObservedSandbox]) -> DiscoveryResult:
    """Record every listed container of one runner; never destroys a sandbox missing from the list."""
    result = DiscoveryResult()
    for sandbox in observed:
        try:
            await _apply_observation(ctx, runner_id, sandbox)
        except _Skip as skip:
            result.skipped.append(SkippedSandbox(sandbox.sandbox_id, str(skip)))
            continue
        result.recorded.append(sandbox.sandbox_id)

    extra = {"action": "inventory_applied", "runner_id": runner_id, "recorded": len(result.recorded), "skipped": len(result.skipped)}
    logger.info("inventory of runner %s applied", runner_id, extra=extra)
    if result.skipped:
        listed = "; ".join(f"{skip.sandbox_id!r}: {skip.reason}" for skip in result.skipped[:LOGGED_SKIPS])
        more = len(result.skipped) - LOGGED_SKIPS
        suffix = f"; and {more} more" if more > 0 else ""
        logger.warning("inventory of runner %s skipped %d sandbox(es): %s%s", runner_id, len(result.skipped), listed, suffix, extra={**extra, "action": "inventory_skipped"})
    return result


async def apply_event(ctx: ManagerContext, runner_id: str, event: ContainerEvent, observed: ObservedSandbox) -> DiscoveryResult:
    """Apply one container event of a runner. The event sets the state, so `observed.state` is ignored."""
    extra = {"action": "sandbox_event_skipped", "runner_id": runner_id, "sandbox_id": observed.sandbox_id, "event": event.value}
    try:
        if event == ContainerEvent.DESTROYED:
            await _apply_destroyed(ctx, runner_id, observed.sandbox_id)
        else:
            await _apply_observation(ctx, runner_id, dataclasses.replace(observed, state=_EVENT_STATES[event]))
    except _Skip as skip:
        logger.warning("%s event of sandbox %r from runner %s skipped: %s", event.value, observed.sandbox_id, runner_id, skip, extra=extra)
        return DiscoveryResult(skipped=[SkippedSandbox(observed.sandbox_id, str(skip))])
    return DiscoveryResult(recorded=[observed.sandbox_id])


async def _apply_observation(ctx: ManagerContext, runner_id: str, observed: ObservedSandbox) -> None:
    _check_observation(observed)
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            await _observe_once(ctx, runner_id, observed)
            return
        except (errors.Conflict, sa_exc.IntegrityError) as exc:
            # Another writer changed or inserted the row between the read and the write.
            if attempt == CONFLICT_ATTEMPTS:
                raise _Skip(f"recording it failed {CONFLICT_ATTEMPTS} times, last with: {exc}") from exc
        except errors.SandboxBackupError as exc:
            raise _Skip(f"recording it failed: {exc}") from exc


def _check_observation(observed: ObservedSandbox) -> None:
    try:
        reference.validate_sandbox_id(observed.sandbox_id)
    except errors.InvalidReference as exc:
        raise _Skip(f"{exc}; rename the container") from exc
    organization = observed.organization_id
    if organization is not None and len(organization) > MAX_ORGANIZATION_ID_LENGTH:
        raise _Skip(f"organization id {organization[:40]!r}... is longer than {MAX_ORGANIZATION_ID_LENGTH} characters; shorten the container's organization label")
    # PostgreSQL cannot store a NUL character in text.
    if organization is not None and "\x00" in organization:
        raise _Skip(f"organization id {organization!r} contains a NUL character; fix the container's organization label")


async def _observe_once(ctx: ManagerContext, runner_id: str, observed: ObservedSandbox) -> None:
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, observed.sandbox_id)

    if sandbox is None:
        # NOTE: a restore drill's throwaway copy ({id}-drill-{hex}) carries the agent's label too,
        # so it is recorded here as a new sandbox, and its removal later destroys that record.
        fields = SandboxFields(state=observed.state, runner_id=runner_id, organization_id=observed.organization_id or None, ephemeral=observed.ephemeral)
        await lifecycle.upsert_sandbox(ctx, observed.sandbox_id, fields)
        logger.info(
            "sandbox %s discovered on runner %s", observed.sandbox_id, runner_id,
            extra={"action": "sandbox_discovered", "sandbox_id": observed.sandbox_id, "runner_id": runner_id, "state": observed.state.value},
        )
        return

    if sandbox.state == SandboxState.DESTROYED:
        raise _Skip("the sandbox is DESTROYED, and a destroyed id is never recorded again; remove the container, or rename it to back it up as a new sandbox")
    _check_may_change(sandbox, runner_id)
    if sandbox.runner_id is None:
        await lifecycle.upsert_sandbox(ctx, sandbox.id, _kept_fields(sandbox, state=observed.state, runner_id=runner_id))
    elif sandbox.state != observed.state:
        # handle_event changes the state alone, so platform-set fields cannot be overwritten.
        await lifecycle.handle_event(ctx, sandbox.id, _LIFECYCLE_EVENTS[observed.state])


def _kept_fields(sandbox: Sandbox, *, state: SandboxState, runner_id: str) -> SandboxFields:
    """Return the row's own fields with only the observed state and runner changed."""
    return SandboxFields(
        state=state,
        runner_id=runner_id,
        organization_id=sandbox.organization_id,
        region=sandbox.region,
        desired_state=sandbox.desired_state,
        ephemeral=sandbox.ephemeral,
    )


def _check_may_change(sandbox: Sandbox, runner_id: str) -> None:
    if sandbox.runner_id is not None and sandbox.runner_id != runner_id:
        raise _Skip(f"the sandbox is recorded on runner {sandbox.runner_id!r}; remove one of the two containers or destroy the sandbox first")
    if sandbox.state not in OBSERVABLE_STATES:
        raise _Skip(f"the sandbox is {sandbox.state.value}, a state that the platform or a restore changes, not discovery")


async def _apply_destroyed(ctx: ManagerContext, runner_id: str, sandbox_id: str) -> None:
    _check_observation(ObservedSandbox(sandbox_id, SandboxState.DESTROYED))
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            await _destroy_once(ctx, runner_id, sandbox_id)
            return
        except errors.Conflict as exc:
            if attempt == CONFLICT_ATTEMPTS:
                raise _Skip(f"recording the destroy failed {CONFLICT_ATTEMPTS} times, last with: {exc}") from exc
        except errors.SandboxBackupError as exc:
            raise _Skip(f"recording the destroy failed: {exc}") from exc


async def _destroy_once(ctx: ManagerContext, runner_id: str, sandbox_id: str) -> None:
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
    if sandbox is None:
        raise _Skip("the sandbox is not known to the manager, so there is nothing to destroy")
    if sandbox.state == SandboxState.DESTROYED:
        return
    if sandbox.runner_id != runner_id:
        raise _Skip(f"the sandbox is recorded on runner {sandbox.runner_id!r}, so removing this runner's container does not destroy it")
    _check_may_change(sandbox, runner_id)
    await lifecycle.handle_event(ctx, sandbox_id, lifecycle.LifecycleEvent.DESTROYED)
