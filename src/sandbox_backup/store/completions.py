"""Write many reported completions in one transaction, with the fences of `backups.complete`.

An attempt is completed only while it is open and awaits exactly the reported image reference
on the reporting runner. Its sandbox shows it only while the sandbox still awaits that attempt.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain.states import BackupState, SandboxBackupState, SandboxState
from sandbox_backup.store.backups import OPEN_STATES, Completed
from sandbox_backup.store.models import Backup, Runner, Sandbox


@dataclasses.dataclass(frozen=True)
class ReportedCompletion:
    runner_id: str
    sandbox_id: str
    image_ref: str
    digest: str
    size_bytes: int | None
    layer_count: int | None


async def runner_tokens(session: AsyncSession, runner_ids: Sequence[str]) -> dict[str, str]:
    """Return the token of each registered runner among `runner_ids`."""
    result = await session.execute(sa.select(Runner.id, Runner.token).where(Runner.id.in_(sorted(set(runner_ids)))))
    return {runner_id: token for runner_id, token in result.all()}


async def complete_many(
    session: AsyncSession, reports: Sequence[ReportedCompletion], *, now: datetime.datetime
) -> dict[str, tuple[Backup, Completed]]:
    """Complete the open attempt each report names; return, by image reference, those completed.

    Each returned attempt is detached and has the columns a log line needs. A report whose
    attempt is not open (or does not exist) is left out.
    """
    if not reports:
        return {}
    by_ref = {report.image_ref: report for report in reports}
    keys = [(r.runner_id, r.sandbox_id, r.image_ref) for r in by_ref.values()]

    def per_report(field: str, column: sa.ColumnElement) -> sa.Case:
        # Typed literals, so a column of NULLs still reaches PostgreSQL as the column's type.
        return sa.case({ref: sa.literal(getattr(report, field), column.type) for ref, report in by_ref.items()}, value=Backup.image_ref)

    statement = (
        sa.update(Backup)
        .where(sa.tuple_(Backup.runner_id, Backup.sandbox_id, Backup.image_ref).in_(keys), Backup.state.in_(OPEN_STATES))
        .values(
            state=BackupState.COMPLETED,
            manifest_digest=per_report("digest", Backup.manifest_digest),
            size_bytes=per_report("size_bytes", Backup.size_bytes),
            layer_count=per_report("layer_count", Backup.layer_count),
            completed_at=now,
            updated_at=now,
            error_reason=None,
            version=Backup.version + 1,
        )
        .returning(Backup.id, Backup.sandbox_id, Backup.runner_id, Backup.registry_id, Backup.image_ref, Backup.attempt, Backup.started_at)
    )
    rows = (await session.execute(statement, execution_options={"synchronize_session": False})).all()
    completed = [
        Backup(id=row[0], sandbox_id=row[1], runner_id=row[2], registry_id=row[3], image_ref=row[4], attempt=row[5], started_at=row[6]) for row in rows
    ]
    states = await _mirror_on_sandboxes(session, completed, now=now)
    return {backup.image_ref: (backup, Completed(states.get(backup.id))) for backup in completed}


async def _mirror_on_sandboxes(session: AsyncSession, completed: list[Backup], *, now: datetime.datetime) -> dict[str, SandboxState | None]:
    """Show each completed attempt on its sandbox; owe the deletion of those whose sandbox is being destroyed.

    Returns the sandbox state by attempt id.
    """
    if not completed:
        return {}
    started = {backup.id: backup.started_at or now for backup in completed}
    mirror = (
        sa.update(Sandbox)
        .where(Sandbox.current_backup_id.in_(list(started)))
        .values(
            backup_state=SandboxBackupState.COMPLETED,
            last_backup_at=now,
            last_backup_started_at=sa.case(
                {backup_id: sa.literal(at, Sandbox.last_backup_started_at.type) for backup_id, at in started.items()}, value=Sandbox.current_backup_id
            ),
            last_attempt_ended_at=now,
            error_reason=None,
            updated_at=now,
            version=Sandbox.version + 1,
        )
        .returning(Sandbox.current_backup_id, Sandbox.state, Sandbox.desired_state)
    )
    seen = {row[0]: (row[1], row[2]) for row in (await session.execute(mirror, execution_options={"synchronize_session": False})).all()}

    # An attempt its sandbox no longer awaits (rare): the sandbox's state still decides the cleanup.
    for backup in completed:
        if backup.id not in seen:
            sandbox = await session.get(Sandbox, backup.sandbox_id, populate_existing=True)
            seen[backup.id] = (sandbox.state, sandbox.desired_state) if sandbox is not None else (None, None)

    doomed = [backup_id for backup_id, states in seen.items() if SandboxState.DESTROYED in states]
    if doomed:
        # Pushes that ended after the destroy: the owed repository deletion removes them too.
        await session.execute(sa.update(Backup).where(Backup.id.in_(doomed)).values(deleted_at=now), execution_options={"synchronize_session": False})
    return {backup_id: states[0] for backup_id, states in seen.items()}
