"""Registry deletions owed after destroy, retried with back-off until done."""

from __future__ import annotations

import datetime
import logging

from sandbox_backup import errors
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import backups, cleanup, fleet, retention_queries
from sandbox_backup.store.models import CleanupTask

logger = logging.getLogger(__name__)

# How long a deletion waits while a push of the sandbox may still be running.
OPEN_ATTEMPT_WAIT_S = 15.0


async def work_cleanup(ctx: ManagerContext) -> int:
    """Work off due deletions; return how many finished."""
    async with ctx.db.transaction() as session:
        tasks = await cleanup.due_tasks(session, now=ctx.now(), limit=ctx.settings.cleanup_batch)
    finished = 0
    for task in tasks:
        if await _work_one(ctx, task):
            finished += 1
    return finished


async def _work_one(ctx: ManagerContext, task: CleanupTask) -> bool:
    async with ctx.db.transaction() as session:
        if task.digest is None:
            # Whole-repository tasks come from destroy. A PENDING attempt of a destroyed sandbox
            # is never dispatched: end it rather than wait on it.
            await backups.cancel_pending(session, task.sandbox_id, reason="sandbox destroyed before the backup started", now=ctx.now())
            open_attempts = await backups.in_progress_count(session, task.sandbox_id)
        else:
            open_attempts = await backups.open_attempt_count(session, task.sandbox_id)
        registry = await fleet.get_registry(session, task.registry_id)

    if open_attempts:
        # A push still running would recreate the repository after we emptied it: wait for it to end.
        await _postpone(ctx, task, error=None, delay_s=OPEN_ATTEMPT_WAIT_S, count_attempt=False)
        return False
    if registry is None:
        await _postpone(ctx, task, error=f"registry {task.registry_id!r} is not registered", delay_s=_backoff(ctx, task), count_attempt=True)
        return False

    try:
        deleted = await _delete_repository(ctx, registry, task)
    except errors.SandboxBackupError as exc:
        logger.warning(
            "registry deletion failed; will retry",
            extra={"action": "cleanup_retry", "sandbox_id": task.sandbox_id, "registry_id": task.registry_id, "repository": task.repository, "attempts": task.attempts + 1, "error": str(exc)},
        )
        await _postpone(ctx, task, error=str(exc), delay_s=_backoff(ctx, task), count_attempt=True)
        return False

    async with ctx.db.transaction() as session:
        await cleanup.mark_done(session, task.id, now=ctx.now())
    logger.info(
        "backups deleted from the registry",
        extra={"action": "cleanup_done", "sandbox_id": task.sandbox_id, "registry_id": task.registry_id, "repository": task.repository, "manifests_deleted": deleted},
    )
    return True


async def _delete_repository(ctx: ManagerContext, registry, task: CleanupTask) -> int:  # type: ignore[no-untyped-def]
    """Delete every manifest of the task's repository (or its one digest); return how many went."""
    deleted = 0
    async with ctx.registry_client(registry) as client:
        if task.digest:
            if await _digest_still_used(ctx, task):
                return 0
            return int(await client.delete_manifest(task.repository, task.digest))

        digests: list[str] = []
        for tag in await client.list_tags(task.repository):
            manifest = await client.head_manifest(task.repository, tag)
            if manifest is not None and manifest.digest not in digests:
                digests.append(manifest.digest)
        for digest in digests:
            deleted += int(await client.delete_manifest(task.repository, digest))
    return deleted


async def _digest_still_used(ctx: ManagerContext, task: CleanupTask) -> bool:
    """Tell whether a live backup still uses the task's manifest (one may complete after the deletion was queued)."""
    async with ctx.db.transaction() as session:
        uses = await retention_queries.manifest_uses(session, [task.digest] if task.digest else [])
    return any(use.registry_id == task.registry_id and f"/{task.repository}:" in use.image_ref for use in uses)


def _backoff(ctx: ManagerContext, task: CleanupTask) -> float:
    return ctx.retry_policy.delay_s(task.attempts + 1, rng=ctx.rng) or 1.0


async def _postpone(ctx: ManagerContext, task: CleanupTask, *, error: str | None, delay_s: float, count_attempt: bool) -> None:
    not_before = ctx.now() + datetime.timedelta(seconds=delay_s)
    async with ctx.db.transaction() as session:
        await cleanup.postpone(session, task.id, error=error, not_before=not_before, count_attempt=count_attempt)
