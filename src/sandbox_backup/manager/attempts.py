"""Ending an attempt: complete it with its digest, or fail it and let the retry policy decide."""

from __future__ import annotations

import datetime
import logging

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import SandboxState
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import backups, fleet
from sandbox_backup.store.models import Backup

logger = logging.getLogger(__name__)


async def complete_attempt(ctx: ManagerContext, backup: Backup, *, digest: str | None, size_bytes: int | None, layer_count: int | None = None) -> bool:
    """Mark `backup` COMPLETED with its manifest digest; look the digest up when the runner gave none.

    Returns False when the attempt was not completed here: it had already ended, the registry has
    no such manifest (the attempt is failed), or the registry could not tell (it stays IN_PROGRESS
    and the next progress check tries again).
    """
    if not digest:
        found = await _resolve_digest(ctx, backup)
        if found is None:
            return False
        digest, size_bytes = found

    now = ctx.now()
    async with ctx.db.transaction() as session:
        current = await backups.get_backup(session, backup.id)
        if current is None:
            return False
        completed = await backups.complete(session, current, digest=digest, size_bytes=size_bytes, layer_count=layer_count, now=now)
    record_completion(ctx, backup, completed, digest=digest, size_bytes=size_bytes, now=now)
    return completed is not None


def record_completion(
    ctx: ManagerContext, backup: Backup, completed: backups.Completed | None, *, digest: str | None, size_bytes: int | None, now: datetime.datetime
) -> None:
    """After a completion was written (or lost its race): metrics, wake-ups and the log line."""
    if completed is None:
        logger.debug("completion ignored: the attempt already ended", extra={"action": "lost_race", "backup_id": backup.id})
        return
    ctx.metrics.record_attempt_end("completed", duration_s=_duration_s(backup, now), size_bytes=size_bytes)
    # A runner slot is free: the next PENDING attempt need not wait for the dispatch tick.
    ctx.wake_dispatch.set()
    if completed.sandbox_state == SandboxState.ARCHIVING:
        # The archive waits for exactly this: a completed backup taken after the archive began.
        ctx.wake_archive.set()
    logger.info(
        "backup completed",
        extra={"action": "backup_completed", "sandbox_id": backup.sandbox_id, "backup_id": backup.id, "runner_id": backup.runner_id, "image_ref": backup.image_ref, "digest": digest},
    )


async def _resolve_digest(ctx: ManagerContext, backup: Backup) -> tuple[str, int] | None:
    async with ctx.db.transaction() as session:
        registry = await fleet.get_registry(session, backup.registry_id)
    if registry is None:
        await fail_attempt(ctx, backup, reason=f"registry {backup.registry_id!r} of the backup is no longer registered", transient=False)
        return None

    parsed = reference.parse_reference(backup.image_ref)
    try:
        async with ctx.registry_client(registry) as client:
            manifest = await client.head_manifest(parsed.repository, parsed.tag or "")
    except errors.RegistryError as exc:
        logger.warning(
            "could not read the backup's digest from the registry; will ask again",
            extra={"action": "digest_unknown", "backup_id": backup.id, "sandbox_id": backup.sandbox_id, "error": str(exc)},
        )
        return None

    if manifest is None:
        await fail_attempt(ctx, backup, reason=f"runner reported {backup.image_ref} as pushed, but the registry has no such manifest", transient=True)
        return None
    return manifest.digest, manifest.size


async def fail_attempt(ctx: ManagerContext, backup: Backup, *, reason: str, transient: bool, outcome: str | None = None) -> Backup | None:
    """End `backup` in ERROR and queue the next attempt when the retry policy allows one.

    `outcome` is the metrics class of the failure ("timed_out", "lost"); by default it is
    "failed_transient" or "failed_permanent".
    """
    now = ctx.now()
    decision = ctx.retry_policy.decide(attempt=backup.attempt, transient=transient, now=now, rng=ctx.rng)
    async with ctx.db.transaction() as session:
        current = await backups.get_backup(session, backup.id)
        if current is None:
            return None
        failed, retry = await backups.fail(session, current, reason=reason, transient=transient, decision=decision, now=now)

    if not failed:
        logger.debug("failure ignored: the attempt already ended", extra={"action": "lost_race", "backup_id": backup.id})
        return None

    ctx.metrics.record_attempt_end(outcome or ("failed_transient" if transient else "failed_permanent"), duration_s=_duration_s(backup, now))
    log_extra = {"sandbox_id": backup.sandbox_id, "backup_id": backup.id, "runner_id": backup.runner_id, "attempt": backup.attempt, "transient": transient, "reason": reason}
    if retry is not None:
        logger.warning("backup attempt failed; retrying", extra={"action": "backup_retry_scheduled", "next_backup_id": retry.id, "next_attempt_at": retry.next_attempt_at.isoformat(), **log_extra})
        if retry.next_attempt_at <= now:
            ctx.wake_dispatch.set()
    else:
        logger.error("backup failed: %s", decision.reason, extra={"action": "backup_failed", **log_extra})
    return retry


def _duration_s(backup: Backup, now: datetime.datetime) -> float | None:
    """Seconds since dispatch, or None for an attempt that was never dispatched."""
    return (now - backup.started_at).total_seconds() if backup.started_at else None
