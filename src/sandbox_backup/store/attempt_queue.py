"""Queue many PENDING attempts in a few statements, with the same fences as `backups.create_attempt`.

A due check or a batch registration may queue thousands of attempts. One INSERT takes them all
(attempts of sandboxes that already have one in flight are skipped by the partial unique index),
and one UPDATE per registry points each sandbox at its new attempt, guarded by the version the
caller read. Attempts whose sandbox changed meanwhile are deleted again in the same transaction,
so the result equals calling `create_attempt` once per sandbox.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.schedule import IN_FLIGHT
from sandbox_backup.domain.states import BACKUP_SOURCE_STATES, BackupState, BackupTrigger, SandboxBackupState, SandboxState
from sandbox_backup.store.models import Backup, Registry, Sandbox

# Rows per INSERT: 12 bound values each stays far below the drivers' limit of 32,767 per statement.
CHUNK = 1000


@dataclasses.dataclass(frozen=True)
class AttemptRequest:
    """One sandbox to queue, as the caller read it, with the registry its backup goes to."""

    sandbox_id: str
    sandbox_version: int
    runner_id: str | None
    registry: Registry
    trigger: BackupTrigger


@dataclasses.dataclass(frozen=True)
class QueuedAttempt:
    backup_id: str
    sandbox_id: str
    runner_id: str | None
    image_ref: str
    trigger: BackupTrigger


@dataclasses.dataclass
class QueueResult:
    queued: list[QueuedAttempt] = dataclasses.field(default_factory=list)
    # (sandbox id, why) for requests whose sandbox id and registry cannot form an image reference.
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)


async def create_attempts(session: AsyncSession, requests: Sequence[AttemptRequest], *, now: datetime.datetime) -> QueueResult:
    """Queue one PENDING attempt per request; return those queued and those that cannot be.

    A request is skipped when its sandbox has an attempt in flight, is no longer in a state that
    is backed up, is being destroyed, or changed since the caller read it.
    """
    result = QueueResult()
    for start in range(0, len(requests), CHUNK):
        await _create_chunk(session, requests[start : start + CHUNK], now=now, result=result)
    return result


async def _create_chunk(session: AsyncSession, requests: Sequence[AttemptRequest], *, now: datetime.datetime, result: QueueResult) -> None:
    planned: dict[str, dict[str, object]] = {}
    for request in requests:
        try:
            planned[request.sandbox_id] = _plan(request, now)
        except errors.InvalidInput as exc:
            result.rejected.append((request.sandbox_id, str(exc)))
    requests = [request for request in requests if request.sandbox_id in planned]
    if not planned:
        return

    inserted = await _insert_ignoring_in_flight(session, list(planned.values()))
    by_registry: dict[str, list[AttemptRequest]] = {}
    for request in requests:
        if planned[request.sandbox_id]["id"] in inserted:
            by_registry.setdefault(request.registry.id, []).append(request)

    claimed: set[str] = set()
    for registry_id, group in by_registry.items():
        claimed |= await _point_sandboxes_at_attempts(session, registry_id, group, now=now)

    orphans = [row["id"] for sandbox_id, row in planned.items() if row["id"] in inserted and sandbox_id not in claimed]
    if orphans:
        # The sandbox moved on between the read and this write: take the attempt back.
        await session.execute(sa.delete(Backup).where(Backup.id.in_(orphans)), execution_options={"synchronize_session": False})

    for request in requests:
        if request.sandbox_id in claimed:
            row = planned[request.sandbox_id]
            result.queued.append(
                QueuedAttempt(backup_id=str(row["id"]), sandbox_id=request.sandbox_id, runner_id=request.runner_id, image_ref=str(row["image_ref"]), trigger=request.trigger)
            )


def _plan(request: AttemptRequest, now: datetime.datetime) -> dict[str, object]:
    registry = request.registry
    return {
        "id": str(uuid.uuid4()),
        "sandbox_id": request.sandbox_id,
        "runner_id": request.runner_id,
        "registry_id": registry.id,
        "image_ref": reference.build_backup_reference(registry.url, registry.project, request.sandbox_id, now),
        "trigger": request.trigger,
        "state": BackupState.PENDING,
        "attempt": 1,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
        "version": 1,
    }


async def _insert_ignoring_in_flight(session: AsyncSession, rows: list[dict[str, object]]) -> set[str]:
    """Insert the rows, skipping each whose sandbox already has an attempt in flight; return the ids inserted."""
    dialect = session.bind.dialect.name
    insert = postgresql.insert(Backup) if dialect == "postgresql" else sqlite.insert(Backup)
    # No conflict target: the conflict that matters is the partial unique index on open attempts.
    statement = insert.values(rows).on_conflict_do_nothing().returning(Backup.id)
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    return set(result.scalars())


async def _point_sandboxes_at_attempts(session: AsyncSession, registry_id: str, requests: list[AttemptRequest], *, now: datetime.datetime) -> set[str]:
    """Make each sandbox's new attempt its current one; return the sandboxes that were still as read."""
    # The partial unique index leaves exactly one open attempt per sandbox: the one inserted above.
    open_attempt = (
        sa.select(Backup.id)
        .where(Backup.sandbox_id == Sandbox.id, Backup.state.in_([BackupState.PENDING, BackupState.IN_PROGRESS]))
        .scalar_subquery()
    )
    statement = (
        sa.update(Sandbox)
        .where(
            sa.tuple_(Sandbox.id, Sandbox.version).in_([(request.sandbox_id, request.sandbox_version) for request in requests]),
            Sandbox.state.in_(list(BACKUP_SOURCE_STATES)),
            sa.or_(Sandbox.desired_state.is_(None), Sandbox.desired_state != SandboxState.DESTROYED),
            Sandbox.backup_state.not_in(list(IN_FLIGHT)),
        )
        .values(
            backup_state=SandboxBackupState.PENDING,
            current_backup_id=open_attempt,
            backup_registry_id=registry_id,
            updated_at=now,
            version=Sandbox.version + 1,
        )
        .returning(Sandbox.id)
    )
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    return set(result.scalars())
