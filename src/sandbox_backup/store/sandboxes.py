"""Queries on sandboxes: upserts from the platform, state changes and the due-check scans."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain.schedule import IN_FLIGHT, DueView
from sandbox_backup.domain.states import SCHEDULABLE_RUNNER_STATES, BackupState, SandboxBackupState, SandboxState
from sandbox_backup.store import guards
from sandbox_backup.store.models import Backup, Runner, Sandbox


@dataclasses.dataclass(frozen=True)
class SandboxFields:
    """Fields a platform reports to the manager about one sandbox."""

    state: SandboxState
    runner_id: str | None = None
    organization_id: str | None = None
    region: str | None = None
    desired_state: SandboxState | None = None
    ephemeral: bool = False


async def get_sandbox(session: AsyncSession, sandbox_id: str) -> Sandbox | None:
    return await session.get(Sandbox, sandbox_id)


async def list_sandboxes(
    session: AsyncSession,
    *,
    limit: int = 1000,
    offset: int = 0,
    state: SandboxState | None = None,
    backup_state: SandboxBackupState | None = None,
    runner_id: str | None = None,
    organization_id: str | None = None,
) -> list[Sandbox]:
    """List sandboxes ordered by id, so `offset` pages stay stable. A filter left as None matches every sandbox."""
    statement = sa.select(Sandbox)
    if state is not None:
        statement = statement.where(Sandbox.state == state)
    if backup_state is not None:
        statement = statement.where(Sandbox.backup_state == backup_state)
    if runner_id is not None:
        statement = statement.where(Sandbox.runner_id == runner_id)
    if organization_id is not None:
        statement = statement.where(Sandbox.organization_id == organization_id)
    result = await session.execute(statement.order_by(Sandbox.id).limit(limit).offset(offset))
    return list(result.scalars())


async def insert_sandbox(session: AsyncSession, sandbox_id: str, fields: SandboxFields, *, now: datetime.datetime) -> Sandbox:
    sandbox = Sandbox(
        id=sandbox_id,
        organization_id=fields.organization_id,
        runner_id=fields.runner_id,
        region=fields.region,
        state=fields.state,
        desired_state=fields.desired_state,
        ephemeral=fields.ephemeral,
        state_changed_at=now,
        created_at=now,
        updated_at=now,
        version=1,
    )
    session.add(sandbox)
    await session.flush()
    return sandbox


async def get_sandboxes(session: AsyncSession, sandbox_ids: Sequence[str]) -> dict[str, Sandbox]:
    """Return the known sandboxes among `sandbox_ids`, by id."""
    if not sandbox_ids:
        return {}
    result = await session.execute(sa.select(Sandbox).where(Sandbox.id.in_(list(sandbox_ids))))
    return {sandbox.id: sandbox for sandbox in result.scalars()}


async def insert_sandboxes(session: AsyncSession, new: Sequence[tuple[str, SandboxFields]], *, now: datetime.datetime) -> None:
    """Insert many new sandboxes with one statement per thousand."""
    rows = [
        {
            "id": sandbox_id,
            "organization_id": fields.organization_id,
            "runner_id": fields.runner_id,
            "region": fields.region,
            "state": fields.state,
            "desired_state": fields.desired_state,
            "ephemeral": fields.ephemeral,
            "backup_state": SandboxBackupState.NONE,
            "state_changed_at": now,
            "created_at": now,
            "updated_at": now,
            "version": 1,
        }
        for sandbox_id, fields in new
    ]
    for start in range(0, len(rows), 1000):
        await session.execute(sa.insert(Sandbox).values(rows[start : start + 1000]), execution_options={"synchronize_session": False})


async def due_rows(session: AsyncSession, sandbox_ids: Sequence[str]) -> list[tuple[Sandbox, Runner | None]]:
    """Return the sandboxes among `sandbox_ids` with their runners, as a due check reads them."""
    if not sandbox_ids:
        return []
    statement = sa.select(Sandbox, Runner).outerjoin(Runner, Runner.id == Sandbox.runner_id).where(Sandbox.id.in_(list(sandbox_ids))).order_by(Sandbox.id)
    return [(row[0], row[1]) for row in (await session.execute(statement)).all()]


async def update_sandbox(session: AsyncSession, sandbox: Sandbox, fields: SandboxFields, *, now: datetime.datetime) -> bool:
    """Apply the platform's view to a known sandbox, guarded by the version read before."""
    values: dict[str, object] = {
        "organization_id": fields.organization_id,
        "runner_id": fields.runner_id,
        "region": fields.region,
        "desired_state": fields.desired_state,
        "ephemeral": fields.ephemeral,
        "state": fields.state,
        "updated_at": now,
    }
    if fields.state != sandbox.state:
        values["state_changed_at"] = now
    updated = await guards.guarded_update(
        session, Sandbox, sandbox.id, expected={"version": sandbox.version}, values=values, action="update_sandbox"
    )
    if updated and fields.runner_id != sandbox.runner_id:
        await _pending_attempt_follows(session, sandbox.id, fields.runner_id)
    return updated


async def _pending_attempt_follows(session: AsyncSession, sandbox_id: str, runner_id: str | None) -> None:
    """Point the sandbox's PENDING attempt at the runner the sandbox is now on.

    Dispatch reads PENDING attempts by their own runner id and sends only those whose sandbox is
    still on that runner, so every write that moves a sandbox calls this in the same transaction.
    """
    # The version changes too, so a claim that read the attempt before the move fails its guard.
    statement = (
        sa.update(Backup)
        .where(Backup.sandbox_id == sandbox_id, Backup.state == BackupState.PENDING)
        .values(runner_id=runner_id, version=Backup.version + 1)
    )
    await session.execute(statement, execution_options={"synchronize_session": False})


async def set_state(session: AsyncSession, sandbox: Sandbox, state: SandboxState, *, now: datetime.datetime, desired_state: SandboxState | None = None) -> bool:
    """Move a sandbox to `state` unless another writer changed it since it was read."""
    values: dict[str, object] = {"state": state, "updated_at": now}
    if state != sandbox.state:
        values["state_changed_at"] = now
    if desired_state is not None:
        values["desired_state"] = desired_state
    return await guards.guarded_update(
        session, Sandbox, sandbox.id, expected={"version": sandbox.version, "state": sandbox.state}, values=values, action=f"set_state:{state.value}"
    )


def due_view(sandbox: Sandbox, runner: Runner | None) -> DueView:
    return DueView(
        state=sandbox.state,
        backup_state=sandbox.backup_state,
        runner_state=runner.state if runner else None,
        organization_id=sandbox.organization_id,
        ephemeral=sandbox.ephemeral,
        desired_state=sandbox.desired_state,
        state_changed_at=sandbox.state_changed_at,
        last_backup_at=sandbox.last_backup_at,
        last_backup_started_at=sandbox.last_backup_started_at,
        last_attempt_ended_at=sandbox.last_attempt_ended_at,
    )


def _backup_candidates(*, error_cutoff: datetime.datetime) -> sa.Select[tuple[Sandbox, Runner]]:
    """Sandboxes that may be backed up at all: on an answering runner, owned, kept, idle.

    A sandbox whose last attempt ended in ERROR waits until `error_cutoff` has passed that end,
    the same gate as `domain.schedule.backup_due`, so a batch never fills up with sandboxes the
    policy then skips.
    """
    error_gate = sa.or_(
        Sandbox.backup_state != SandboxBackupState.ERROR,
        Sandbox.last_attempt_ended_at.is_(None),
        Sandbox.last_attempt_ended_at <= error_cutoff,
    )
    return (
        sa.select(Sandbox, Runner)
        .join(Runner, Runner.id == Sandbox.runner_id)
        .where(
            Runner.state.in_(list(SCHEDULABLE_RUNNER_STATES)),
            Sandbox.organization_id.is_not(None),
            Sandbox.ephemeral.is_(False),
            sa.or_(Sandbox.desired_state.is_(None), Sandbox.desired_state != SandboxState.DESTROYED),
            Sandbox.backup_state.not_in(list(IN_FLIGHT)),
            error_gate,
        )
    )


async def running_due_candidates(session: AsyncSession, *, now: datetime.datetime, interval: datetime.timedelta, limit: int) -> list[tuple[Sandbox, Runner]]:
    """Running sandboxes whose newest completed backup is older than `interval`, oldest first."""
    cutoff = now - interval
    statement = (
        _backup_candidates(error_cutoff=cutoff)
        .where(Sandbox.state == SandboxState.STARTED, sa.or_(Sandbox.last_backup_at.is_(None), Sandbox.last_backup_at <= cutoff))
        .order_by(Sandbox.last_backup_at.asc().nulls_first(), Sandbox.id)
        .limit(limit)
    )
    result = await session.execute(statement)
    return [(row[0], row[1]) for row in result.all()]


async def stopped_due_candidates(session: AsyncSession, *, now: datetime.datetime, interval: datetime.timedelta, limit: int) -> list[tuple[Sandbox, Runner]]:
    """Stopped and archiving sandboxes with no backup dispatched since they entered that state."""
    statement = (
        _backup_candidates(error_cutoff=now - interval)
        .where(
            Sandbox.state.in_([SandboxState.STOPPED, SandboxState.ARCHIVING]),
            sa.or_(Sandbox.last_backup_started_at.is_(None), Sandbox.last_backup_started_at <= Sandbox.state_changed_at),
        )
        .order_by(Sandbox.state_changed_at, Sandbox.id)
        .limit(limit)
    )
    result = await session.execute(statement)
    return [(row[0], row[1]) for row in result.all()]


async def move_to_runner(
    session: AsyncSession, sandbox_id: str, *, runner_id: str, started: bool, now: datetime.datetime, expected_state: SandboxState
) -> bool:
    """Record that the sandbox now lives on `runner_id`: STARTED after a restore, unchanged after a move.

    Only while the sandbox is still in `expected_state`, so a destroy or start that came in
    meanwhile is never overwritten.
    """
    sandbox = await session.get(Sandbox, sandbox_id, populate_existing=True)
    if sandbox is None or sandbox.state != expected_state or sandbox.desired_state == SandboxState.DESTROYED:
        return False
    values: dict[str, object] = {"runner_id": runner_id, "error_reason": None, "updated_at": now}
    if started:
        values.update(state=SandboxState.STARTED, state_changed_at=now)
    expected = {"version": sandbox.version, "state": expected_state}
    moved = await guards.guarded_update(session, Sandbox, sandbox_id, expected=expected, values=values, action="move_to_runner")
    if moved and runner_id != sandbox.runner_id:
        await _pending_attempt_follows(session, sandbox_id, runner_id)
    return moved


async def mark_error(session: AsyncSession, sandbox_id: str, *, reason: str, now: datetime.datetime) -> bool:
    sandbox = await session.get(Sandbox, sandbox_id, populate_existing=True)
    if sandbox is None or sandbox.state == SandboxState.DESTROYED:
        return False
    return await guards.guarded_update(
        session,
        Sandbox,
        sandbox_id,
        expected={"version": sandbox.version},
        values={"state": SandboxState.ERROR, "state_changed_at": now, "error_reason": reason, "updated_at": now},
        action="mark_error",
    )


async def finish_archive(session: AsyncSession, sandbox: Sandbox, *, now: datetime.datetime) -> bool:
    """ARCHIVING to ARCHIVED: the sandbox has left its runner."""
    archived = await guards.guarded_update(
        session,
        Sandbox,
        sandbox.id,
        expected={"version": sandbox.version, "state": SandboxState.ARCHIVING},
        values={"state": SandboxState.ARCHIVED, "state_changed_at": now, "runner_id": None, "error_reason": None, "updated_at": now},
        action="finish_archive",
    )
    if archived and sandbox.runner_id is not None:
        await _pending_attempt_follows(session, sandbox.id, None)
    return archived


async def archiving_ready(session: AsyncSession, *, limit: int) -> list[Sandbox]:
    """Archiving sandboxes whose newest completed backup was dispatched after the archive began."""
    statement = (
        sa.select(Sandbox)
        .where(
            Sandbox.state == SandboxState.ARCHIVING,
            Sandbox.last_backup_started_at.is_not(None),
            Sandbox.last_backup_started_at > Sandbox.state_changed_at,
        )
        .order_by(Sandbox.state_changed_at)
        .limit(limit)
    )
    return list((await session.execute(statement)).scalars())


async def on_runner(session: AsyncSession, runner_id: str) -> list[Sandbox]:
    statement = sa.select(Sandbox).where(Sandbox.runner_id == runner_id, Sandbox.state.not_in([SandboxState.DESTROYED, SandboxState.ARCHIVED])).order_by(Sandbox.id)
    return list((await session.execute(statement)).scalars())


async def set_retention_policy(session: AsyncSession, sandbox_id: str, policy_json: str | None, *, now: datetime.datetime) -> bool:
    sandbox = await session.get(Sandbox, sandbox_id, populate_existing=True)
    if sandbox is None:
        return False
    return await guards.guarded_update(
        session, Sandbox, sandbox_id, expected={"version": sandbox.version}, values={"retention_policy": policy_json, "updated_at": now}, action="set_retention_policy"
    )
