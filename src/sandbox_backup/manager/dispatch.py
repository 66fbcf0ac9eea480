"""Dispatch: send PENDING attempts to their runners, under each runner's cap, fair across runners."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from sandbox_backup import errors
from sandbox_backup.manager import attempts, health
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.runner.models import RegistryCredentials
from sandbox_backup.store import backups, fleet
from sandbox_backup.store.models import Backup, Registry, Runner

logger = logging.getLogger(__name__)

# A runner answers 400 with this text when the attempt is already running on it.
ALREADY_RUNNING_MARKERS = ("already in progress",)


@dataclasses.dataclass(frozen=True)
class ClaimedAttempt:
    backup: Backup
    runner: Runner
    registry: Registry

    def log_extra(self) -> dict[str, object]:
        backup = self.backup
        return {"sandbox_id": backup.sandbox_id, "backup_id": backup.id, "runner_id": self.runner.id, "image_ref": backup.image_ref, "attempt": backup.attempt}


async def dispatch_pending(ctx: ManagerContext) -> int:
    """Claim due PENDING attempts and send each to its runner; return how many were sent.

    Reading the candidates and claiming them is one transaction with a handful of statements,
    whatever the number of attempts; the runner calls then run concurrently, and the accepted
    attempts are recorded together afterwards.
    """
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(
            session, now=ctx.now(), default_cap=ctx.settings.max_concurrent_backups_per_runner, limit=ctx.settings.dispatch_batch
        )
        rows = await backups.claim_batch(session, candidates, now=ctx.now()) if candidates else []
    if not rows:
        return 0

    claimed = [ClaimedAttempt(*row) for row in rows]
    ctx.metrics.attempts_started.inc(len(claimed))
    sent = await asyncio.gather(*(_send(ctx, attempt) for attempt in claimed))
    await _record_accepted(ctx, [attempt for attempt, ok in zip(claimed, sent, strict=True) if ok])
    return len(claimed)


async def _send(ctx: ManagerContext, attempt: ClaimedAttempt) -> bool:
    """Start the attempt on its runner; return True when the runner took it."""
    backup, runner, registry = attempt.backup, attempt.runner, attempt.registry
    credentials = RegistryCredentials(url=registry.url, project=registry.project, username=registry.username, password=registry.password)
    try:
        async with ctx.runner_calls:
            await ctx.runner_client(runner).create_backup(backup.sandbox_id, credentials, backup.image_ref)
    except errors.RunnerRejected as exc:
        if any(marker in str(exc).lower() for marker in ALREADY_RUNNING_MARKERS):
            return True
        await attempts.fail_attempt(ctx, backup, reason=f"runner {runner.id} rejected the backup: {exc}", transient=exc.status_code == 409)
        return False
    except errors.RunnerError as exc:
        # The next health pass probes this runner even if it accepted a backup moments ago.
        ctx.runner_accepted_at.pop(runner.id, None)
        await attempts.fail_attempt(ctx, backup, reason=f"could not start the backup on runner {runner.id}: {exc}", transient=True)
        return False
    ctx.runner_accepted_at[runner.id] = ctx.now()
    return True


async def _record_accepted(ctx: ManagerContext, accepted: list[ClaimedAttempt]) -> None:
    if not accepted:
        return
    now = ctx.now()
    # An accepted backup proves the runner is healthy, as an answered probe does, so a busy
    # runner's last_seen_at stays current without probes. It is written at most once a minute.
    seen_before = now - health.LAST_SEEN_RESOLUTION
    stale = {attempt.runner.id for attempt in accepted if attempt.runner.last_seen_at is None or attempt.runner.last_seen_at < seen_before}
    async with ctx.db.transaction() as session:
        still_open = await backups.mark_accepted(session, [attempt.backup.id for attempt in accepted], now=now)
        if stale:
            await fleet.mark_seen(session, list(stale), now=now, older_than=seen_before)
    for attempt in accepted:
        if attempt.backup.id in still_open:
            logger.info("backup started on runner", extra={"action": "backup_dispatched", **attempt.log_extra()})
        else:
            # A fast runner may report the end before the acceptance is recorded.
            logger.info("backup started on runner and already ended", extra={"action": "backup_dispatched", **attempt.log_extra()})
