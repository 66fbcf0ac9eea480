"""Due checks: queue a PENDING attempt for every sandbox whose backup is due."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup import errors
from sandbox_backup.coordination import keys
from sandbox_backup.domain import schedule
from sandbox_backup.domain.states import BackupTrigger
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import attempt_queue, backups, fleet, sandboxes
from sandbox_backup.store.models import Backup, Registry, Runner, Sandbox

logger = logging.getLogger(__name__)

SANDBOX_LOCK_TTL_S = 30.0


# Batches one due-check pass may take; a full batch that queued something is followed by another.
MAX_BATCHES_PER_PASS = 1000


async def check_running_due(ctx: ManagerContext) -> int:
    """Queue backups of running sandboxes whose newest completed backup is older than the interval."""

    async def batch(session):  # type: ignore[no-untyped-def]
        return await sandboxes.running_due_candidates(session, now=ctx.now(), interval=ctx.backup_interval, limit=ctx.settings.due_check_batch)

    return await _queue_all_due(ctx, batch)


async def check_stopped_due(ctx: ManagerContext) -> int:
    """Queue backups of stopped and archiving sandboxes not backed up since they stopped."""

    async def batch(session):  # type: ignore[no-untyped-def]
        return await sandboxes.stopped_due_candidates(session, now=ctx.now(), interval=ctx.backup_interval, limit=ctx.settings.due_check_batch)

    return await _queue_all_due(ctx, batch)


async def _queue_all_due(ctx: ManagerContext, fetch_batch) -> int:  # type: ignore[no-untyped-def]
    """Queue every due sandbox now, batch after batch, instead of one batch per tick.

    Each batch is read and queued in one transaction. The inserts are guarded by the sandbox
    versions read, so a sandbox that changes meanwhile is left for the next pass.
    """
    total = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        now = ctx.now()
        async with ctx.db.transaction() as session:
            candidates = await fetch_batch(session)
            registries = await fleet.list_registries(session) if candidates else []
            queued = await queue_due_batch(ctx, session, candidates, registries, now=now)
        total += len(queued)
        # Queued sandboxes leave the candidate set; a batch that queued nothing would come back the same.
        if len(candidates) < ctx.settings.due_check_batch or not queued:
            break
    if total:
        ctx.wake_dispatch.set()
    return total


async def queue_due_batch(
    ctx: ManagerContext, session: AsyncSession, candidates: Sequence[tuple[Sandbox, Runner | None]], registries: list[Registry], *, now: datetime.datetime
) -> list[attempt_queue.QueuedAttempt]:
    """Queue an attempt for each candidate whose backup is due, inside the caller's transaction."""
    by_id = {registry.id: registry for registry in registries}
    requests = []
    for sandbox, runner in candidates:
        trigger = schedule.backup_due(sandboxes.due_view(sandbox, runner), now=now, interval=ctx.backup_interval)
        if trigger is None:
            continue
        registry = by_id.get(sandbox.backup_registry_id) if sandbox.backup_registry_id else fleet.pick_backup_registry(
            registries, organization_id=sandbox.organization_id, region=sandbox.region
        )
        if registry is None:
            _log_no_registry(sandbox)
            continue
        requests.append(attempt_queue.AttemptRequest(sandbox.id, sandbox.version, sandbox.runner_id, registry, trigger))

    result = await attempt_queue.create_attempts(session, requests, now=now)
    for sandbox_id, error in result.rejected:
        logger.error(
            "cannot queue a backup of this sandbox; fix its registry settings",
            extra={"action": "backup_queue_failed", "sandbox_id": sandbox_id, "error": error},
        )
    for queued in result.queued:
        logger.info(
            "backup queued",
            extra={"action": "backup_queued", "sandbox_id": queued.sandbox_id, "backup_id": queued.backup_id, "runner_id": queued.runner_id, "trigger": queued.trigger.value, "image_ref": queued.image_ref},
        )
    return result.queued


async def queue_backup(ctx: ManagerContext, sandbox_id: str, trigger: BackupTrigger, *, wait_for_lock: bool) -> Backup | None:
    """Queue one attempt for `sandbox_id` under the sandbox's lock; None if one is in flight or the lock is busy."""
    lock = ctx.coordinator.lock(keys.sandbox_lock_name(sandbox_id), ttl_s=SANDBOX_LOCK_TTL_S)
    if not await lock.acquire(blocking=wait_for_lock, timeout_s=SANDBOX_LOCK_TTL_S if wait_for_lock else None):
        if wait_for_lock:
            raise errors.Conflict(f"sandbox {sandbox_id!r} is being changed by another request; try again")
        return None
    try:
        return await _queue_locked(ctx, sandbox_id, trigger)
    finally:
        await lock.release()


async def _queue_locked(ctx: ManagerContext, sandbox_id: str, trigger: BackupTrigger) -> Backup | None:
    now = ctx.now()
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
        if sandbox is None:
            return None
        registry = await _registry_for(session, sandbox)
        if registry is None:
            _log_no_registry(sandbox)
            return None
        backup = await backups.create_attempt(session, sandbox, registry=registry, trigger=trigger, now=now)

    if backup is not None:
        logger.info(
            "backup queued",
            extra={"action": "backup_queued", "sandbox_id": sandbox_id, "backup_id": backup.id, "runner_id": sandbox.runner_id, "trigger": trigger.value, "image_ref": backup.image_ref},
        )
    return backup


async def _registry_for(session, sandbox: Sandbox) -> Registry | None:  # type: ignore[no-untyped-def]
    if sandbox.backup_registry_id:
        return await fleet.get_registry(session, sandbox.backup_registry_id)
    return await fleet.choose_backup_registry(session, organization_id=sandbox.organization_id, region=sandbox.region)


def _log_no_registry(sandbox: Sandbox) -> None:
    logger.error(
        "no registry is configured for this sandbox's backups; register a default registry",
        extra={"action": "no_registry", "sandbox_id": sandbox.id, "organization_id": sandbox.organization_id, "region": sandbox.region},
    )
