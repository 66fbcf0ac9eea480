"""Read-only queries behind the manager's /metrics gauges: queues, runner states, backup ages."""

from __future__ import annotations

import dataclasses
import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain.states import BackupState, SandboxState
from sandbox_backup.store.models import Backup, CleanupTask, Runner, Sandbox


@dataclasses.dataclass(frozen=True)
class FleetSnapshot:
    """Database state at one scrape. Ages are in seconds before `taken_at`."""

    taken_at: datetime.datetime
    pending_by_runner: dict[str, int]
    in_progress_by_runner: dict[str, int]
    runner_states: dict[str, str]
    deletions_owed: int
    # Per running sandbox that is backed up: seconds since its newest COMPLETED backup, or since
    # the sandbox was recorded when it has none yet.
    newest_backup_ages_s: list[float]
    never_backed_up: int


async def fleet_snapshot(session: AsyncSession, *, now: datetime.datetime) -> FleetSnapshot:
    pending, in_progress = await _open_attempts_by_runner(session)
    runner_rows = await session.execute(sa.select(Runner.id, Runner.state))
    owed = await session.execute(sa.select(sa.func.count()).select_from(CleanupTask).where(CleanupTask.done_at.is_(None)))
    ages, never = await _newest_backup_ages(session, now=now)
    return FleetSnapshot(
        taken_at=now,
        pending_by_runner=pending,
        in_progress_by_runner=in_progress,
        runner_states={runner_id: state.value for runner_id, state in runner_rows.all()},
        deletions_owed=owed.scalar_one(),
        newest_backup_ages_s=ages,
        never_backed_up=never,
    )


async def _open_attempts_by_runner(session: AsyncSession) -> tuple[dict[str, int], dict[str, int]]:
    # A PENDING attempt has no runner until it is claimed, so it counts on its sandbox's runner.
    runner_id = sa.func.coalesce(Backup.runner_id, Sandbox.runner_id, "")
    statement = (
        sa.select(Backup.state, runner_id, sa.func.count())
        .join(Sandbox, Sandbox.id == Backup.sandbox_id)
        .where(Backup.state.in_([BackupState.PENDING, BackupState.IN_PROGRESS]))
        .group_by(Backup.state, runner_id)
    )
    pending: dict[str, int] = {}
    in_progress: dict[str, int] = {}
    for state, runner, count in (await session.execute(statement)).all():
        target = pending if state == BackupState.PENDING else in_progress
        target[runner] = count
    return pending, in_progress


async def _newest_backup_ages(session: AsyncSession, *, now: datetime.datetime) -> tuple[list[float], int]:
    """Return the backup ages of running sandboxes that the schedule backs up, and how many have no backup.

    Those are owned, not ephemeral and not being destroyed.
    """
    # NOTE: every scrape reads one row per running sandbox. For fleets far beyond some tens of
    # thousands of sandboxes (an estimate, not measured), move the bucket counts into SQL.
    statement = sa.select(Sandbox.last_backup_at, Sandbox.created_at).where(
        Sandbox.state == SandboxState.STARTED,
        Sandbox.organization_id.is_not(None),
        Sandbox.ephemeral.is_(False),
        sa.or_(Sandbox.desired_state.is_(None), Sandbox.desired_state != SandboxState.DESTROYED),
    )
    ages: list[float] = []
    never = 0
    for last_backup_at, created_at in (await session.execute(statement)).all():
        if last_backup_at is None:
            never += 1
        since = last_backup_at or created_at
        ages.append(max(0.0, (now - since).total_seconds()))
    return ages, never
