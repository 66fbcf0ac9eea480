"""Queries on restores: create, lease to one worker, advance, finish."""

from __future__ import annotations

import datetime
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain.states import OPEN_RESTORE_STATES, BackupState, RestorePurpose, RestoreState
from sandbox_backup.store import guards
from sandbox_backup.store.models import Backup, Restore


async def create(
    session: AsyncSession,
    *,
    sandbox_id: str,
    purpose: RestorePurpose,
    target_sandbox_id: str,
    previous_runner_id: str | None,
    requested_backup_id: str | None,
    requested_runner_id: str | None,
    now: datetime.datetime,
) -> Restore:
    restore = Restore(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox_id,
        purpose=purpose.value,
        state=RestoreState.PENDING.value,
        requested_backup_id=requested_backup_id,
        requested_runner_id=requested_runner_id,
        previous_runner_id=previous_runner_id,
        target_sandbox_id=target_sandbox_id,
        registry_attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
        version=1,
    )
    session.add(restore)
    await session.flush()
    return restore


async def get(session: AsyncSession, restore_id: str) -> Restore | None:
    return await session.get(Restore, restore_id, populate_existing=True)


async def open_for_sandbox(session: AsyncSession, sandbox_id: str, *, purposes: tuple[RestorePurpose, ...] | None = None) -> Restore | None:
    statement = sa.select(Restore).where(Restore.sandbox_id == sandbox_id, Restore.state.in_([s.value for s in OPEN_RESTORE_STATES]))
    if purposes:
        statement = statement.where(Restore.purpose.in_([p.value for p in purposes]))
    return (await session.execute(statement.limit(1))).scalar_one_or_none()


async def list_for_sandbox(session: AsyncSession, sandbox_id: str) -> list[Restore]:
    statement = sa.select(Restore).where(Restore.sandbox_id == sandbox_id).order_by(Restore.created_at.desc())
    return list((await session.execute(statement)).scalars())


async def due(session: AsyncSession, *, now: datetime.datetime, limit: int) -> list[Restore]:
    """Open restores whose lease ran out or that wait for their next try."""
    statement = (
        sa.select(Restore)
        .where(Restore.state.in_([s.value for s in OPEN_RESTORE_STATES]), Restore.next_attempt_at <= now)
        .order_by(Restore.next_attempt_at, Restore.id)
        .limit(limit)
    )
    return list((await session.execute(statement)).scalars())


async def lease(session: AsyncSession, restore: Restore, *, until: datetime.datetime, now: datetime.datetime) -> bool:
    """Take a restore for one worker until `until`; False when another worker has it."""
    return await guards.guarded_update(
        session,
        Restore,
        restore.id,
        expected={"version": restore.version, "state": [s.value for s in OPEN_RESTORE_STATES]},
        values={"state": RestoreState.RUNNING.value, "next_attempt_at": until, "updated_at": now},
        action="lease_restore",
    )


async def update(session: AsyncSession, restore_id: str, *, now: datetime.datetime, **values: object) -> bool:
    """Change an open restore; False once it has finished."""
    return await guards.guarded_update(
        session,
        Restore,
        restore_id,
        expected={"state": [s.value for s in OPEN_RESTORE_STATES]},
        values={**values, "updated_at": now},
        action="update_restore",
    )


async def finish(session: AsyncSession, restore_id: str, *, state: RestoreState, now: datetime.datetime, error_reason: str | None = None) -> bool:
    return await update(session, restore_id, now=now, state=state.value, completed_at=now, error_reason=error_reason)


async def restore_candidates(session: AsyncSession, sandbox_id: str) -> list[Backup]:
    """COMPLETED backups of a sandbox that restore may use, newest first."""
    statement = (
        sa.select(Backup)
        .where(
            Backup.sandbox_id == sandbox_id,
            Backup.state == BackupState.COMPLETED,
            Backup.broken_at.is_(None),
            Backup.deleted_at.is_(None),
        )
        .order_by(Backup.completed_at.desc(), Backup.id)
    )
    return list((await session.execute(statement)).scalars())


async def mark_broken(session: AsyncSession, backup: Backup, *, reason: str, now: datetime.datetime) -> bool:
    return await guards.guarded_update(
        session,
        Backup,
        backup.id,
        expected={"state": BackupState.COMPLETED, "broken_at": None},
        values={"broken_at": now, "broken_reason": reason, "updated_at": now},
        action="mark_broken",
    )


async def record_verified(session: AsyncSession, backup: Backup, *, now: datetime.datetime) -> None:
    """Record that a drill restored this backup and the copy ran."""
    statement = sa.update(Backup).where(Backup.id == backup.id, Backup.broken_at.is_(None)).values(verified_at=now, updated_at=now)
    await session.execute(statement, execution_options={"synchronize_session": False})
