"""The durable queue of registry deletions still owed."""

from __future__ import annotations

import datetime
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.store.models import CleanupTask


async def enqueue(
    session: AsyncSession,
    *,
    sandbox_id: str,
    registry_id: str,
    repository: str,
    now: datetime.datetime,
    digest: str | None = None,
) -> CleanupTask:
    """Record that `repository` (or one manifest of it) must be deleted from a registry."""
    task = CleanupTask(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox_id,
        registry_id=registry_id,
        repository=repository,
        digest=digest,
        not_before=now,
        attempts=0,
        created_at=now,
    )
    session.add(task)
    await session.flush()
    return task


async def due_tasks(session: AsyncSession, *, now: datetime.datetime, limit: int) -> list[CleanupTask]:
    statement = (
        sa.select(CleanupTask)
        .where(CleanupTask.done_at.is_(None), CleanupTask.not_before <= now)
        .order_by(CleanupTask.not_before, CleanupTask.id)
        .limit(limit)
    )
    return list((await session.execute(statement)).scalars())


async def mark_done(session: AsyncSession, task_id: str, *, now: datetime.datetime) -> None:
    statement = sa.update(CleanupTask).where(CleanupTask.id == task_id, CleanupTask.done_at.is_(None)).values(done_at=now, last_error=None)
    await session.execute(statement, execution_options={"synchronize_session": False})


async def postpone(session: AsyncSession, task_id: str, *, error: str | None, not_before: datetime.datetime, count_attempt: bool) -> None:
    """Try again at `not_before`; `count_attempt` is False when the task only waited for a push to end."""
    values: dict[str, object] = {"not_before": not_before, "last_error": error}
    if count_attempt:
        values["attempts"] = CleanupTask.attempts + 1
    statement = sa.update(CleanupTask).where(CleanupTask.id == task_id, CleanupTask.done_at.is_(None)).values(**values)
    await session.execute(statement, execution_options={"synchronize_session": False})


async def owed_count(session: AsyncSession, *, sandbox_id: str | None = None) -> int:
    statement = sa.select(sa.func.count()).select_from(CleanupTask).where(CleanupTask.done_at.is_(None))
    if sandbox_id is not None:
        statement = statement.where(CleanupTask.sandbox_id == sandbox_id)
    return (await session.execute(statement)).scalar_one()


async def owed_counts(session: AsyncSession, sandbox_ids: list[str]) -> dict[str, int]:
    """Deletions still owed per sandbox, for the given ids (absent means none)."""
    if not sandbox_ids:
        return {}
    statement = (
        sa.select(CleanupTask.sandbox_id, sa.func.count())
        .where(CleanupTask.done_at.is_(None), CleanupTask.sandbox_id.in_(sandbox_ids))
        .group_by(CleanupTask.sandbox_id)
    )
    return {sandbox_id: count for sandbox_id, count in (await session.execute(statement)).all()}
