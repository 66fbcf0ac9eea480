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

from sandbox_backup.domain.states import BackupState
from sandbox_backup.store.backups import OPEN_STATES, Completed, mirror_completions
from sandbox_backup.store.models import Backup, Runner


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
    states = await mirror_completions(session, completed, now=now)
    return {backup.image_ref: (backup, Completed(states.get(backup.id))) for backup in completed}
