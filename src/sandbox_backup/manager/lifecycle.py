"""Sandboxes as the platform reports them, and lifecycle events handled at once."""

from __future__ import annotations

import enum
import logging

from sandbox_backup import errors
from sandbox_backup.coordination import keys
from sandbox_backup.domain import reference, schedule
from sandbox_backup.domain.states import BACKUP_SOURCE_STATES, SCHEDULABLE_RUNNER_STATES, BackupTrigger, SandboxState
from sandbox_backup.manager import restore as restore_flow
from sandbox_backup.manager import scheduling
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import backups, cleanup, fleet, sandboxes
from sandbox_backup.store.models import Backup, Sandbox
from sandbox_backup.store.sandboxes import SandboxFields

logger = logging.getLogger(__name__)


class LifecycleEvent(str, enum.Enum):
    STARTED = "started"
    STOPPED = "stopped"
    ARCHIVE_REQUESTED = "archive_requested"
    DESTROYED = "destroyed"
    BACKUP_REQUESTED = "backup_requested"


EVENT_STATES = {
    LifecycleEvent.STARTED: SandboxState.STARTED,
    LifecycleEvent.STOPPED: SandboxState.STOPPED,
    LifecycleEvent.ARCHIVE_REQUESTED: SandboxState.ARCHIVING,
    LifecycleEvent.DESTROYED: SandboxState.DESTROYED,
}


async def upsert_sandbox(ctx: ManagerContext, sandbox_id: str, fields: SandboxFields) -> Sandbox:
    """Record the platform's view of a sandbox and act on a state change at once.

    Raises InvalidReference for an id that cannot form an image reference and NotFound for an
    unknown runner; nothing is written in either case.
    """
    reference.validate_sandbox_id(sandbox_id)
    now = ctx.now()
    async with ctx.db.transaction() as session:
        if fields.runner_id is not None and await fleet.get_runner(session, fields.runner_id) is None:
            raise errors.NotFound(f"runner {fields.runner_id!r} is not registered; register it first with PUT /api/v1/runners/{fields.runner_id}")
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
        previous_state = sandbox.state if sandbox else None
        if sandbox is not None and sandbox.state == SandboxState.DESTROYED and fields.state != SandboxState.DESTROYED:
            # The id is used again by a new sandbox. Its old repository must be empty first: the
            # destroy cleanup deletes every tag, so a new backup taken before would go too.
            if await cleanup.owed_count(session, sandbox_id=sandbox_id):
                raise errors.Conflict(f"sandbox {sandbox_id!r} was destroyed and its backups are still being deleted; register it again after that")
        if sandbox is None:
            sandbox = await sandboxes.insert_sandbox(session, sandbox_id, fields, now=now)
        elif not await sandboxes.update_sandbox(session, sandbox, fields, now=now):
            raise errors.Conflict(f"sandbox {sandbox_id!r} changed while it was being updated; send the update again")

    logger.info(
        "sandbox recorded",
        extra={"action": "sandbox_upserted", "sandbox_id": sandbox_id, "runner_id": fields.runner_id, "state": fields.state.value},
    )
    if previous_state != fields.state:
        await _after_state_change(ctx, sandbox_id, fields.state)
    return await get_sandbox(ctx, sandbox_id)


def _check_not_destroyed(sandbox: Sandbox, target: SandboxState) -> None:
    """DESTROYED is final: a late event or update must not bring a sandbox back."""
    if sandbox.state == SandboxState.DESTROYED and target != SandboxState.DESTROYED:
        raise errors.Conflict(f"sandbox {sandbox.id!r} is destroyed; register a new sandbox id instead of changing it to {target.value}")


async def get_sandbox(ctx: ManagerContext, sandbox_id: str) -> Sandbox:
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
    if sandbox is None:
        raise errors.NotFound(f"sandbox {sandbox_id!r} is not known to the manager")
    return sandbox


async def handle_event(ctx: ManagerContext, sandbox_id: str, event: LifecycleEvent) -> Sandbox | Backup:
    """Apply one lifecycle event now, not at the next tick."""
    if event == LifecycleEvent.BACKUP_REQUESTED:
        return await request_backup(ctx, sandbox_id)

    target = EVENT_STATES[event]
    sandbox = await get_sandbox(ctx, sandbox_id)
    _check_not_destroyed(sandbox, target)
    if sandbox.state == SandboxState.RESTORING and target != SandboxState.DESTROYED:
        raise errors.Conflict(f"sandbox {sandbox_id!r} is being restored; send {event.value} after the restore ends")
    if event == LifecycleEvent.STARTED and sandbox.state == SandboxState.ARCHIVED:
        # An archived sandbox has no runner any more: starting it is a restore.
        await restore_flow.request_restore(ctx, sandbox_id)
        return await get_sandbox(ctx, sandbox_id)
    if sandbox.state != target:
        desired = SandboxState.DESTROYED if target == SandboxState.DESTROYED else None
        async with ctx.db.transaction() as session:
            changed = await sandboxes.set_state(session, sandbox, target, now=ctx.now(), desired_state=desired)
        if not changed:
            raise errors.Conflict(f"sandbox {sandbox_id!r} changed while the {event.value} event was applied; send it again")
        logger.info("sandbox state changed", extra={"action": "sandbox_state_changed", "sandbox_id": sandbox_id, "from_state": sandbox.state.value, "to_state": target.value, "event": event.value})
        await _after_state_change(ctx, sandbox_id, target)
    return await get_sandbox(ctx, sandbox_id)


async def _after_state_change(ctx: ManagerContext, sandbox_id: str, state: SandboxState) -> None:
    if state == SandboxState.DESTROYED:
        await on_destroyed(ctx, sandbox_id)
        return
    if state in (SandboxState.STOPPED, SandboxState.ARCHIVING):
        trigger = BackupTrigger.ARCHIVE if state == SandboxState.ARCHIVING else BackupTrigger.STOPPED
        await _queue_if_due(ctx, sandbox_id, trigger)
    elif state == SandboxState.STARTED:
        # A running sandbox that is due (never backed up, or its newest backup is older than the
        # interval) is queued now rather than at the next due check, up to an interval later.
        await _queue_if_due(ctx, sandbox_id, BackupTrigger.SCHEDULE)


async def _queue_if_due(ctx: ManagerContext, sandbox_id: str, trigger: BackupTrigger) -> None:
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
        runner = await fleet.get_runner(session, sandbox.runner_id) if sandbox and sandbox.runner_id else None
    if sandbox is None or schedule.backup_due(sandboxes.due_view(sandbox, runner), now=ctx.now(), interval=ctx.backup_interval) is None:
        return
    if await scheduling.queue_backup(ctx, sandbox_id, trigger, wait_for_lock=True) is not None:
        ctx.wake_dispatch.set()


async def request_backup(ctx: ManagerContext, sandbox_id: str) -> Backup:
    """Queue a backup now; return the attempt already in flight when there is one."""
    sandbox = await get_sandbox(ctx, sandbox_id)
    async with ctx.db.transaction() as session:
        runner = await fleet.get_runner(session, sandbox.runner_id) if sandbox.runner_id else None
        in_flight = await backups.get_backup(session, sandbox.current_backup_id) if sandbox.current_backup_id else None

    _check_can_back_up(sandbox, runner)
    if in_flight is not None and in_flight.state.value in ("PENDING", "IN_PROGRESS"):
        return in_flight

    backup = await scheduling.queue_backup(ctx, sandbox_id, BackupTrigger.REQUESTED, wait_for_lock=True)
    if backup is None:
        current = await get_sandbox(ctx, sandbox_id)
        if current.state not in BACKUP_SOURCE_STATES or current.desired_state == SandboxState.DESTROYED:
            raise errors.Conflict(f"sandbox {sandbox_id!r} became {current.state.value} while the backup was requested; nothing was queued")
        async with ctx.db.transaction() as session:
            in_flight = await backups.get_backup(session, current.current_backup_id) if current.current_backup_id else None
        if in_flight is None or in_flight.state.value not in ("PENDING", "IN_PROGRESS"):
            raise errors.Conflict(f"no backup of sandbox {sandbox_id!r} could be queued: no registry is configured for it; register a default registry")
        return in_flight
    ctx.wake_dispatch.set()
    return backup


def _check_can_back_up(sandbox: Sandbox, runner) -> None:  # type: ignore[no-untyped-def]
    reason = schedule.never_backed_up_reason(sandboxes.due_view(sandbox, runner))
    if reason:
        raise errors.Conflict(f"sandbox {sandbox.id!r} is never backed up: {reason}")
    if sandbox.state not in BACKUP_SOURCE_STATES:
        raise errors.Conflict(f"sandbox {sandbox.id!r} is {sandbox.state.value}; only STARTED, STOPPED or ARCHIVING sandboxes can be backed up")
    if runner is None or runner.state not in SCHEDULABLE_RUNNER_STATES:
        state = runner.state.value if runner else "unassigned"
        raise errors.Conflict(f"sandbox {sandbox.id!r} is on runner {sandbox.runner_id!r} which is {state}; a backup needs a READY or DRAINING runner")


async def on_destroyed(ctx: ManagerContext, sandbox_id: str) -> None:
    now = ctx.now()
    lock = ctx.coordinator.lock(keys.sandbox_lock_name(sandbox_id), ttl_s=scheduling.SANDBOX_LOCK_TTL_S)
    # Destroy goes ahead even when the wait times out: the guarded updates below are the fence,
    # and the lock only keeps a due check from queueing an attempt in between.
    await lock.acquire(blocking=True, timeout_s=scheduling.SANDBOX_LOCK_TTL_S)
    try:
        async with ctx.db.transaction() as session:
            cancelled = await backups.cancel_pending(session, sandbox_id, reason="sandbox destroyed before the backup started", now=now)
            await backups.mark_all_deleted(session, sandbox_id, now=now)
            sandbox = await sandboxes.get_sandbox(session, sandbox_id)
            task = None
            if sandbox is not None and sandbox.backup_registry_id:
                registry = await fleet.get_registry(session, sandbox.backup_registry_id)
                repository = reference.backup_repository(registry.project if registry else None, sandbox_id)
                task = await cleanup.enqueue(session, sandbox_id=sandbox_id, registry_id=sandbox.backup_registry_id, repository=repository, now=now)
    finally:
        await lock.release()

    logger.info(
        "sandbox destroyed; its backups are owed for deletion",
        extra={"action": "sandbox_destroyed", "sandbox_id": sandbox_id, "cancelled_attempts": cancelled, "cleanup_task_id": task.id if task else None},
    )
    ctx.wake_cleanup.set()
