"""Pruning: apply each sandbox's retention policy and queue the deletion of what it drops.

A pruned backup gets `deleted_at` and a cleanup task for its manifest digest, in one transaction,
and the cleanup job deletes the manifest later. Two backups can share a digest (identical content),
and the registry deletes a manifest by digest, so a digest is queued only when no live backup in
the same registry repository still references it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup import errors
from sandbox_backup.config import Settings
from sandbox_backup.domain import reference
from sandbox_backup.domain.retention import BackupView, RetentionPlan, RetentionPolicy, evaluate, parse_policy
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import cleanup, retention_queries, sandboxes
from sandbox_backup.store.models import Backup

logger = logging.getLogger(__name__)

# (registry id, repository, manifest digest): what one cleanup task deletes.
ManifestKey = tuple[str, str, str]


class HasRetentionPolicy(Protocol):
    id: str
    retention_policy: str | None


@dataclasses.dataclass(frozen=True)
class SandboxPrune:
    """Outcome of pruning one sandbox, or of a dry run: the plan, pruned backups, queued manifests.

    Only `error` is set when the sandbox's policy could not be read.
    """

    sandbox_id: str
    plan: RetentionPlan | None = None
    pruned_ids: tuple[str, ...] = ()
    queued: tuple[ManifestKey, ...] = ()
    error: str | None = None


@dataclasses.dataclass
class PruneResult:
    """Sandboxes where pruning deleted something, would delete something, or failed.

    For a single sandbox the entry is present even when nothing is deleted.
    """

    dry_run: bool
    sandboxes: list[SandboxPrune] = dataclasses.field(default_factory=list)

    @property
    def pruned_count(self) -> int:
        return sum(len(entry.pruned_ids) for entry in self.sandboxes)


def default_policy(settings: Settings) -> RetentionPolicy:
    """Return the global retention policy from the `retention_*` settings."""
    return RetentionPolicy(
        keep_last=settings.retention_keep_last,
        keep_hourly=settings.retention_keep_hourly,
        keep_daily=settings.retention_keep_daily,
        keep_weekly=settings.retention_keep_weekly,
        keep_monthly=settings.retention_keep_monthly,
        min_verified=settings.retention_min_verified,
    )


def policy_for(settings: Settings, sandbox: HasRetentionPolicy) -> RetentionPolicy:
    """Return the sandbox's policy: its JSON fields over the global default.

    Raises InvalidInput naming the sandbox and the field when the stored JSON is invalid.
    """
    try:
        return parse_policy(sandbox.retention_policy, defaults=default_policy(settings))
    except errors.InvalidInput as exc:
        raise errors.InvalidInput(f"sandbox {sandbox.id!r}: {exc}") from exc


async def prune(ctx: ManagerContext, *, sandbox_id: str | None = None, dry_run: bool = False) -> PruneResult:
    """Apply retention to one sandbox, or to every sandbox with live backups.

    A dry run returns the same plans and the digests that would be queued, and writes nothing.
    Raises NotFound for an unknown `sandbox_id`.
    """
    result = PruneResult(dry_run=dry_run)
    if sandbox_id is not None:
        async with ctx.db.transaction() as session:
            if await sandboxes.get_sandbox(session, sandbox_id) is None:
                raise errors.NotFound(f"sandbox {sandbox_id!r} is not known to the manager")
        result.sandboxes.append(await _prune_sandbox(ctx, sandbox_id, dry_run=dry_run))
        return result

    async for entry in _prune_every_sandbox(ctx, dry_run=dry_run):
        if entry.pruned_ids or entry.error:
            result.sandboxes.append(entry)
    return result


async def prune_all(ctx: ManagerContext) -> int:
    """Prune every sandbox (the periodic job body); return how many backups were pruned."""
    pruned = 0
    failed = 0
    async for entry in _prune_every_sandbox(ctx, dry_run=False):
        pruned += len(entry.pruned_ids)
        failed += entry.error is not None

    if pruned or failed:
        logger.info("retention pass finished", extra={"action": "prune_pass", "pruned": pruned, "sandboxes_failed": failed})
    return pruned


async def _prune_every_sandbox(ctx: ManagerContext, *, dry_run: bool) -> AsyncIterator[SandboxPrune]:
    """Yield a SandboxPrune per sandbox with live backups, reading sandbox ids a page at a time."""
    after: str | None = None
    while True:
        async with ctx.db.transaction() as session:
            page = await retention_queries.sandboxes_with_backups(session, after=after, limit=ctx.settings.retention_batch)
        if not page:
            return

        for sandbox_id in page:
            yield await _prune_sandbox(ctx, sandbox_id, dry_run=dry_run)
        after = page[-1]


async def _prune_sandbox(ctx: ManagerContext, sandbox_id: str, *, dry_run: bool) -> SandboxPrune:
    now = ctx.now()
    async with ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, sandbox_id)
        live = await retention_queries.live_backups(session, sandbox_id)
        protected = await retention_queries.protected_backup_ids(session, sandbox_id)

    try:
        policy = policy_for(ctx.settings, sandbox) if sandbox is not None else default_policy(ctx.settings)
    except errors.InvalidInput as exc:
        # A policy that cannot be read might have kept more, so this sandbox keeps everything for now.
        logger.error(
            "retention skipped: the sandbox's retention policy is invalid; fix it through the API",
            extra={"action": "prune_skipped", "sandbox_id": sandbox_id, "error": str(exc)},
        )
        return SandboxPrune(sandbox_id, error=str(exc))

    plan = evaluate([_view(backup) for backup in live], policy=policy, now=now, protected_ids=protected)
    doomed = [backup for backup in live if backup.id not in plan.keep]
    if not doomed:
        return SandboxPrune(sandbox_id, plan=plan)
    if dry_run:
        async with ctx.db.transaction() as session:
            queued = await _manifests_to_delete(session, doomed)
        return SandboxPrune(sandbox_id, plan=plan, pruned_ids=tuple(backup.id for backup in doomed), queued=tuple(queued))

    return await _apply(ctx, sandbox_id, plan, doomed)


async def _apply(ctx: ManagerContext, sandbox_id: str, plan: RetentionPlan, doomed: list[Backup]) -> SandboxPrune:
    """Mark the doomed backups deleted and queue their manifests, in one transaction."""
    now = ctx.now()
    async with ctx.db.transaction() as session:
        await retention_queries.lock_sandbox_for_pruning(session, sandbox_id)
        # A backup that a restore took meanwhile, or another pruner got first, is left alone.
        pruned = [backup for backup in doomed if await retention_queries.mark_deleted(session, backup.id, now=now)]
        queued = await _manifests_to_delete(session, pruned)
        for registry_id, repository, digest in queued:
            await cleanup.enqueue(session, sandbox_id=sandbox_id, registry_id=registry_id, repository=repository, digest=digest, now=now)

    _log_pruned(sandbox_id, plan, pruned, queued)
    if queued:
        ctx.wake_cleanup.set()
    return SandboxPrune(sandbox_id, plan=plan, pruned_ids=tuple(backup.id for backup in pruned), queued=tuple(queued))


async def _manifests_to_delete(session: AsyncSession, pruned: Sequence[Backup]) -> list[ManifestKey]:
    """Return the manifests of `pruned` that no other live backup in the same repository references."""
    candidates: list[ManifestKey] = []
    for backup in pruned:
        key = _manifest_key(backup.registry_id, backup.image_ref, backup.manifest_digest)
        if key is not None and key not in candidates:
            candidates.append(key)

    pruned_ids = {backup.id for backup in pruned}
    uses = await retention_queries.manifest_uses(session, [digest for _, _, digest in candidates])
    in_use = {
        _manifest_key(use.registry_id, use.image_ref, use.digest)
        for use in uses
        if use.backup_id not in pruned_ids
    }
    # A live backup whose reference cannot be parsed might sit in any repository of its registry.
    blocked_everywhere = {(use.registry_id, use.digest) for use in uses if use.backup_id not in pruned_ids and _repository(use.image_ref) is None}
    return [key for key in candidates if key not in in_use and (key[0], key[2]) not in blocked_everywhere]


def _manifest_key(registry_id: str, image_ref: str, digest: str | None) -> ManifestKey | None:
    repository = _repository(image_ref)
    if repository is None or not digest:
        return None
    return (registry_id, repository, digest)


def _repository(image_ref: str) -> str | None:
    try:
        return reference.parse_reference(image_ref).repository
    except errors.InvalidReference:
        return None


def _view(backup: Backup) -> BackupView:
    # COMPLETED rows always carry completed_at; fall back to created_at for rows written by hand.
    completed_at = backup.completed_at or backup.created_at
    return BackupView(id=backup.id, completed_at=completed_at, verified=backup.verified_at is not None, broken=backup.broken_at is not None)


def _log_pruned(sandbox_id: str, plan: RetentionPlan, pruned: list[Backup], queued: list[ManifestKey]) -> None:
    queued_digests = {digest for _, _, digest in queued}
    for backup in pruned:
        extra = {
            "action": "backup_pruned",
            "sandbox_id": sandbox_id,
            "backup_id": backup.id,
            "registry_id": backup.registry_id,
            "digest": backup.manifest_digest,
            "manifest_deletion_queued": backup.manifest_digest in queued_digests,
            "broken": backup.broken_at is not None,
        }
        if _manifest_key(backup.registry_id, backup.image_ref, backup.manifest_digest) is None:
            # NOTE: without a digest or a parsable reference no deletion can be queued, so the
            # manifest stays in the registry until the sandbox's repository is deleted.
            logger.warning("backup pruned, but its manifest cannot be deleted: no digest or an invalid image reference", extra=extra)
        else:
            logger.info("backup pruned by the retention policy", extra={**extra, "kept": len(plan.keep)})
