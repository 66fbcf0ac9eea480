"""Archive: a sandbox leaves its runner only after a fresh backup is COMPLETED and verified.

"Fresh" means dispatched after the archive began, so it contains everything the sandbox wrote before
it was archived. The backup is verified in the registry (the tag resolves to the digest recorded
at completion) before the container is destroyed on the runner.
"""

from __future__ import annotations

import logging

from sandbox_backup import errors
from sandbox_backup.domain.states import SandboxState
from sandbox_backup.manager import verification
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import backups, fleet, guards, restores, sandboxes
from sandbox_backup.store.models import Sandbox

logger = logging.getLogger(__name__)


async def finish_archives(ctx: ManagerContext) -> int:
    """Finish every archiving sandbox whose fresh backup is complete; return how many left their runner.

    Once a registry cannot confirm a backup, the pass skips the other archives whose backups are
    in that registry, so an unreachable registry costs one call per pass, not one per sandbox.
    """
    async with ctx.db.transaction() as session:
        ready = await sandboxes.archiving_ready(session, limit=ctx.settings.due_check_batch)
    finished = 0
    unconfirmed: set[str] = set()
    for sandbox in ready:
        if sandbox.backup_registry_id in unconfirmed:
            continue
        if await finish_archive(ctx, sandbox.id, skip_registries=unconfirmed):
            finished += 1
    return finished


async def finish_archive(ctx: ManagerContext, sandbox_id: str, *, skip_registries: set[str] | None = None) -> bool:
    """Finish one archive if its fresh backup verifies. A registry that cannot confirm it is added to `skip_registries`."""
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
        backup = await backups.get_backup(session, sandbox.current_backup_id) if sandbox and sandbox.current_backup_id else None
        registry = await fleet.get_registry(session, backup.registry_id) if backup else None
    if sandbox is None or sandbox.state != SandboxState.ARCHIVING or backup is None or registry is None:
        return False
    if backup.state.value != "COMPLETED" or backup.started_at is None or backup.started_at <= sandbox.state_changed_at:
        return False
    if skip_registries is not None and registry.id in skip_registries:
        return False

    log_extra = {"sandbox_id": sandbox_id, "backup_id": backup.id, "runner_id": sandbox.runner_id}
    outcome = verification.VerifyOutcome.BROKEN if backup.broken_at else await verification.verify_backup(ctx, backup.id)
    if outcome == verification.VerifyOutcome.UNKNOWN:
        logger.warning(
            "archive waits: the registry could not confirm the backup; its other archives wait for the next pass",
            extra={"action": "archive_waiting", "registry_id": registry.id, **log_extra},
        )
        if skip_registries is not None:
            skip_registries.add(registry.id)
        return False
    if outcome == verification.VerifyOutcome.BROKEN:
        async with ctx.db.transaction() as session:
            checked = await backups.get_backup(session, backup.id)
        await _require_new_backup(ctx, sandbox, backup.id, (checked.broken_reason if checked else None) or "the backup did not verify")
        return False

    if sandbox.runner_id and not await _destroy_on_runner(ctx, sandbox):
        return False
    async with ctx.db.transaction() as session:
        current = await sandboxes.get_sandbox(session, sandbox_id)
        done = current is not None and await sandboxes.finish_archive(session, current, now=ctx.now())
    if done:
        logger.info("sandbox archived: it left its runner after a verified backup", extra={"action": "sandbox_archived", "image_ref": backup.image_ref, **log_extra})
    return done


async def _destroy_on_runner(ctx: ManagerContext, sandbox: Sandbox) -> bool:
    async with ctx.db.transaction() as session:
        runner = await fleet.get_runner(session, sandbox.runner_id) if sandbox.runner_id else None
    if runner is None:
        return True
    try:
        await ctx.runner_client(runner).destroy_sandbox(sandbox.id)
    except errors.RunnerError as exc:
        logger.warning("archive waits: could not remove the container from its runner", extra={"action": "archive_waiting", "sandbox_id": sandbox.id, "runner_id": runner.id, "error": str(exc)})
        return False
    return True


async def _require_new_backup(ctx: ManagerContext, sandbox: Sandbox, backup_id: str, reason: str) -> None:
    """Mark the fresh backup broken after a failed verification, so the due check queues another."""
    now = ctx.now()
    async with ctx.db.transaction() as session:
        backup = await backups.get_backup(session, backup_id)
        if backup is not None:
            await restores.mark_broken(session, backup, reason=reason, now=now)
        await guards.guarded_update(
            session,
            Sandbox,
            sandbox.id,
            expected={"current_backup_id": backup_id},
            values={"last_backup_started_at": None, "updated_at": now},
            action="require_new_backup",
        )
    logger.warning("archive needs a new backup: the fresh one did not verify", extra={"action": "archive_backup_broken", "sandbox_id": sandbox.id, "backup_id": backup_id, "reason": reason})
