"""Dispatch: send PENDING attempts to their runners, under each runner's cap, fair across runners."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from sandbox_backup import errors
from sandbox_backup.manager import attempts
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.runner.models import RegistryCredentials
from sandbox_backup.store import backups, fleet
from sandbox_backup.store.backups import DispatchCandidate
from sandbox_backup.store.models import Backup, Registry, Runner

logger = logging.getLogger(__name__)

# A runner answers 400 with this text when the attempt is already running on it.
ALREADY_RUNNING_MARKERS = ("already in progress",)


@dataclasses.dataclass(frozen=True)
class ClaimedAttempt:
    backup: Backup
    runner: Runner
    registry: Registry


async def dispatch_pending(ctx: ManagerContext) -> int:
    """Claim due PENDING attempts and send each to its runner; return how many were sent."""
    now = ctx.now()
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(
            session, now=now, default_cap=ctx.settings.max_concurrent_backups_per_runner, limit=ctx.settings.dispatch_batch
        )
    if not candidates:
        return 0

    claimed = [attempt for attempt in [await _claim(ctx, candidate) for candidate in candidates] if attempt is not None]
    await asyncio.gather(*(_send(ctx, attempt) for attempt in claimed))
    return len(claimed)


async def _claim(ctx: ManagerContext, candidate: DispatchCandidate) -> ClaimedAttempt | None:
    async with ctx.db.transaction() as session:
        if not await backups.claim(session, candidate, now=ctx.now()):
            return None
        ctx.metrics.attempts_started.inc()
        backup = await backups.get_backup(session, candidate.backup_id)
        runner = await fleet.get_runner(session, candidate.runner_id)
        registry = await fleet.get_registry(session, backup.registry_id) if backup else None
    if backup is None or runner is None or registry is None:
        return None
    return ClaimedAttempt(backup, runner, registry)


async def _send(ctx: ManagerContext, attempt: ClaimedAttempt) -> None:
    backup, runner, registry = attempt.backup, attempt.runner, attempt.registry
    credentials = RegistryCredentials(url=registry.url, project=registry.project, username=registry.username, password=registry.password)
    log_extra = {"sandbox_id": backup.sandbox_id, "backup_id": backup.id, "runner_id": runner.id, "image_ref": backup.image_ref, "attempt": backup.attempt}

    try:
        async with ctx.runner_calls:
            await ctx.runner_client(runner).create_backup(backup.sandbox_id, credentials, backup.image_ref)
    except errors.RunnerRejected as exc:
        if any(marker in str(exc).lower() for marker in ALREADY_RUNNING_MARKERS):
            await _accept(ctx, backup, log_extra)
            return
        await attempts.fail_attempt(ctx, backup, reason=f"runner {runner.id} rejected the backup: {exc}", transient=exc.status_code == 409)
        return
    except errors.RunnerError as exc:
        await attempts.fail_attempt(ctx, backup, reason=f"could not start the backup on runner {runner.id}: {exc}", transient=True)
        return

    await _accept(ctx, backup, log_extra)


async def _accept(ctx: ManagerContext, backup: Backup, log_extra: dict[str, object]) -> None:
    async with ctx.db.transaction() as session:
        accepted = await backups.mark_accepted(session, backup.id, now=ctx.now())
    if accepted:
        logger.info("backup started on runner", extra={"action": "backup_dispatched", **log_extra})
    else:
        logger.debug("runner accepted an attempt that has already ended", extra={"action": "lost_race", **log_extra})
