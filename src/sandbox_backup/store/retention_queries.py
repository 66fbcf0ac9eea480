"""Queries for retention and verification of COMPLETED backups.

A backup here is a COMPLETED row of `backups`. Once `deleted_at` is set, its manifest deletion is
queued and the row is only history. Every write is guarded, so a lost race changes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain.states import OPEN_RESTORE_STATES, BackupState
from sandbox_backup.store import guards
from sandbox_backup.store.models import Backup, Restore, Sandbox


@dataclasses.dataclass(frozen=True)
class ManifestUse:
    """A live backup that references a manifest digest in one registry."""

    backup_id: str
    registry_id: str
    image_ref: str
    digest: str


def _live() -> list[sa.ColumnElement[bool]]:
    return [Backup.state == BackupState.COMPLETED, Backup.deleted_at.is_(None)]


def _used_by_open_restore() -> sa.Exists:
    """True for a backup that a PENDING or RUNNING restore uses now or was asked to use."""
    uses_backup = sa.or_(Restore.backup_id == Backup.id, Restore.requested_backup_id == Backup.id)
    open_states = [state.value for state in OPEN_RESTORE_STATES]
    return sa.exists().where(Restore.state.in_(open_states), uses_backup)


async def sandboxes_with_backups(session: AsyncSession, *, after: str | None, limit: int) -> list[str]:
    """Return the ids of sandboxes with live backups, in id order after `after` (keyset pagination)."""
    statement = sa.select(Backup.sandbox_id).where(*_live()).group_by(Backup.sandbox_id).order_by(Backup.sandbox_id).limit(limit)
    if after is not None:
        statement = statement.where(Backup.sandbox_id > after)
    return list((await session.execute(statement)).scalars())


async def live_backups(session: AsyncSession, sandbox_id: str) -> list[Backup]:
    """Return the COMPLETED, not deleted backups of one sandbox, newest first."""
    statement = sa.select(Backup).where(Backup.sandbox_id == sandbox_id, *_live()).order_by(Backup.completed_at.desc(), Backup.id.desc())
    return list((await session.execute(statement)).scalars())


async def protected_backup_ids(session: AsyncSession, sandbox_id: str) -> set[str]:
    """Return the ids of the sandbox's live backups that an open restore uses or was asked to use."""
    statement = sa.select(Backup.id).where(Backup.sandbox_id == sandbox_id, *_live(), _used_by_open_restore())
    return set((await session.execute(statement)).scalars())


async def lock_sandbox_for_pruning(session: AsyncSession, sandbox_id: str) -> None:
    """Lock the sandbox row until the transaction ends, so two pruners of one sandbox take turns.

    Each pruner then reads the other's deletions when it checks which digests are still in use.
    Without the lock, two pruners that delete the two last backups sharing a digest would each
    find the other's backup still live, and neither would queue the digest. SQLite needs no lock
    because it runs one write transaction at a time.
    """
    if session.bind.dialect.name == "postgresql":
        await session.execute(sa.select(Sandbox.id).where(Sandbox.id == sandbox_id).with_for_update())


async def mark_deleted(session: AsyncSession, backup_id: str, *, now: datetime.datetime) -> bool:
    """Set `deleted_at` on a live backup. Returns False when it is already deleted or a restore uses it.

    The restore check is part of the UPDATE, so a restore recorded after the plan was made still
    saves its backup.
    """
    statement = (
        sa.update(Backup)
        .where(Backup.id == backup_id, *_live(), ~_used_by_open_restore())
        .values(deleted_at=now, updated_at=now, version=Backup.version + 1)
    )
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    return result.rowcount == 1


async def manifest_uses(session: AsyncSession, digests: Collection[str]) -> list[ManifestUse]:
    """Return the live backups, of any sandbox, whose manifest digest is one of `digests`."""
    if not digests:
        return []
    statement = sa.select(Backup.id, Backup.registry_id, Backup.image_ref, Backup.manifest_digest).where(
        *_live(), Backup.manifest_digest.in_(list(digests))
    )
    return [ManifestUse(*row) for row in (await session.execute(statement)).all()]


async def due_for_verification(
    session: AsyncSession,
    *,
    verified_before: datetime.datetime,
    limit: int,
    skip_ids: Collection[str] = (),
    skip_registry_ids: Collection[str] = (),
) -> list[Backup]:
    """Return live, unbroken backups never verified or last verified before `verified_before`.

    Never verified ones come first, then the least recently verified, then the oldest.
    """
    statement = (
        sa.select(Backup)
        .where(
            *_live(),
            Backup.broken_at.is_(None),
            sa.or_(Backup.verified_at.is_(None), Backup.verified_at < verified_before),
        )
        .order_by(Backup.verified_at.asc().nulls_first(), Backup.completed_at, Backup.id)
        .limit(limit)
    )
    if skip_ids:
        statement = statement.where(Backup.id.not_in(list(skip_ids)))
    if skip_registry_ids:
        statement = statement.where(Backup.registry_id.not_in(list(skip_registry_ids)))
    return list((await session.execute(statement)).scalars())


async def record_verified(
    session: AsyncSession, backup: Backup, *, size_bytes: int | None, layer_count: int, now: datetime.datetime
) -> bool:
    """Record a successful verification. A `size_bytes` of None keeps the size stored before."""
    values: dict[str, object] = {"verified_at": now, "layer_count": layer_count, "updated_at": now}
    if size_bytes is not None:
        values["size_bytes"] = size_bytes
    return await guards.guarded_update(session, Backup, backup.id, expected=_unchanged(backup), values=values, action="record_verified")


async def record_broken(session: AsyncSession, backup: Backup, *, reason: str, now: datetime.datetime) -> bool:
    """Mark a backup broken. Restore and verification skip it from then on, and retention deletes it."""
    values = {"broken_at": now, "broken_reason": reason, "updated_at": now}
    return await guards.guarded_update(session, Backup, backup.id, expected=_unchanged(backup), values=values, action="record_broken")


def _unchanged(backup: Backup) -> dict[str, object]:
    # Written only while the row is still the live, unbroken backup that was checked.
    return {"state": BackupState.COMPLETED, "deleted_at": None, "broken_at": None, "version": backup.version}
