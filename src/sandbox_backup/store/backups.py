"""The life of a backup attempt in the database: create, claim, accept, complete, fail.

Every write is guarded. The backup row is guarded by its state and version; the backup columns of
the sandbox row are guarded by `current_backup_id`, so only the attempt the sandbox awaits can move
them. A partial unique index keeps at most one PENDING or IN_PROGRESS attempt per sandbox.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain import reference
from sandbox_backup.domain.retry import RetryDecision
from sandbox_backup.domain.schedule import IN_FLIGHT, STATE_PRIORITY
from sandbox_backup.domain.states import BACKUP_SOURCE_STATES, SCHEDULABLE_RUNNER_STATES, BackupState, BackupTrigger, SandboxBackupState, SandboxState
from sandbox_backup.store import guards
from sandbox_backup.store.models import Backup, Registry, Runner, Sandbox

OPEN_STATES = (BackupState.PENDING, BackupState.IN_PROGRESS)


@dataclasses.dataclass(frozen=True)
class DispatchCandidate:
    backup_id: str
    backup_version: int
    sandbox_id: str
    runner_id: str
    cap: int


async def get_backup(session: AsyncSession, backup_id: str) -> Backup | None:
    return await session.get(Backup, backup_id)


async def list_for_sandbox(
    session: AsyncSession, sandbox_id: str, *, limit: int = 1000, offset: int = 0, state: BackupState | None = None
) -> list[Backup]:
    """List a sandbox's attempts, newest first. A `state` of None matches every state."""
    statement = sa.select(Backup).where(Backup.sandbox_id == sandbox_id)
    if state is not None:
        statement = statement.where(Backup.state == state)
    # The id breaks ties between attempts created at the same time, so `offset` pages stay stable.
    statement = statement.order_by(Backup.created_at.desc(), Backup.attempt.desc(), Backup.id).limit(limit).offset(offset)
    result = await session.execute(statement)
    return list(result.scalars())


async def create_attempt(
    session: AsyncSession,
    sandbox: Sandbox,
    *,
    registry: Registry,
    trigger: BackupTrigger,
    now: datetime.datetime,
    attempt: int = 1,
    next_attempt_at: datetime.datetime | None = None,
) -> Backup | None:
    """Queue a PENDING attempt for `sandbox`; None when another attempt is in flight or the row moved.

    The registry is pinned to the sandbox at its first attempt, so its whole history stays in one
    registry. Raises InvalidReference when the sandbox id cannot form an image reference.
    """
    if sandbox.state not in BACKUP_SOURCE_STATES or sandbox.desired_state == SandboxState.DESTROYED:
        return None
    image_ref = reference.build_backup_reference(registry.url, registry.project, sandbox.id, now)
    backup = Backup(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox.id,
        runner_id=sandbox.runner_id,
        registry_id=registry.id,
        image_ref=image_ref,
        trigger=trigger,
        state=BackupState.PENDING,
        attempt=attempt,
        next_attempt_at=next_attempt_at or now,
        created_at=now,
        updated_at=now,
        version=1,
    )

    savepoint = await session.begin_nested()
    try:
        session.add(backup)
        await session.flush()
    except sa_exc.IntegrityError:
        await savepoint.rollback()
        return None

    claimed = await guards.guarded_update(
        session,
        Sandbox,
        sandbox.id,
        expected={
            "version": sandbox.version,
            "state": list(BACKUP_SOURCE_STATES),
            "backup_state": [s for s in SandboxBackupState if s not in IN_FLIGHT],
        },
        values={
            "backup_state": SandboxBackupState.PENDING,
            "current_backup_id": backup.id,
            "backup_registry_id": registry.id,
            "updated_at": now,
        },
        action="create_attempt",
    )
    if not claimed:
        await savepoint.rollback()
        return None
    await savepoint.commit()
    return backup


async def dispatch_candidates(session: AsyncSession, *, now: datetime.datetime, default_cap: int, limit: int) -> list[DispatchCandidate]:
    """PENDING attempts that fit under their runner's cap, fair across runners.

    Within a runner the order is archiving, stopped, started, then oldest completed backup first.
    Across runners, every runner's first candidate comes before any runner's second, so one busy
    runner cannot starve the rest when `limit` cuts the list.
    """
    room = await runners_with_room(session, default_cap=default_cap)
    if not room:
        return []

    # The runners with room go in as a list of values, and a PENDING attempt carries its sandbox's
    # runner. So the planner reads only those runners' attempts through the (state, runner_id)
    # index. A subquery there made it scan every PENDING attempt of the fleet on each pass.
    runner_ids = list(room)
    priority = sa.case(
        *[(Sandbox.state == state, rank) for state, rank in STATE_PRIORITY.items()], else_=len(STATE_PRIORITY)
    )
    rank = sa.func.row_number().over(
        partition_by=Backup.runner_id,
        order_by=[priority, Sandbox.last_backup_at.asc().nulls_first(), Backup.created_at, Backup.id],
    )
    ranked = (
        sa.select(
            Backup.id.label("backup_id"),
            Backup.version.label("backup_version"),
            Sandbox.id.label("sandbox_id"),
            Backup.runner_id.label("runner_id"),
            priority.label("priority"),
            rank.label("rank"),
        )
        .join(Sandbox, sa.and_(Sandbox.id == Backup.sandbox_id, Sandbox.runner_id == Backup.runner_id))
        .where(
            Backup.runner_id.in_(runner_ids),
            Sandbox.runner_id.in_(runner_ids),
            Backup.state == BackupState.PENDING,
            Backup.next_attempt_at <= now,
            Sandbox.state.in_(list(STATE_PRIORITY)),
            sa.or_(Sandbox.desired_state.is_(None), Sandbox.desired_state != SandboxState.DESTROYED),
        )
        .subquery()
    )
    # The largest free count bounds the rank in SQL, and each runner's own count is applied below.
    # A CASE of every runner's count would make a new statement, compiled and cached anew, for
    # each number of runners with room.
    max_free = max(slots for _cap, slots in room.values())
    statement = (
        sa.select(ranked.c.backup_id, ranked.c.backup_version, ranked.c.sandbox_id, ranked.c.runner_id, ranked.c.rank)
        .where(ranked.c.rank <= max_free)
        .order_by(ranked.c.rank, ranked.c.priority, ranked.c.runner_id)
    )
    result = await session.execute(statement)
    fitting = [row for row in result.all() if row.rank <= room[row.runner_id][1]]
    return [DispatchCandidate(row.backup_id, row.backup_version, row.sandbox_id, row.runner_id, cap=room[row.runner_id][0]) for row in fitting[:limit]]


async def runners_with_room(session: AsyncSession, *, default_cap: int) -> dict[str, tuple[int, int]]:
    """Return (cap, free slots) for each schedulable runner below its cap, by runner id."""
    in_flight = (
        sa.select(Backup.runner_id, sa.func.count().label("n"))
        .where(Backup.state == BackupState.IN_PROGRESS)
        .group_by(Backup.runner_id)
        .subquery()
    )
    cap = sa.func.coalesce(Runner.max_concurrent_backups, default_cap)
    free = cap - sa.func.coalesce(in_flight.c.n, 0)
    statement = (
        sa.select(Runner.id, cap, free)
        .outerjoin(in_flight, in_flight.c.runner_id == Runner.id)
        .where(Runner.state.in_(list(SCHEDULABLE_RUNNER_STATES)), free > 0)
    )
    result = await session.execute(statement)
    return {runner_id: (runner_cap, slots) for runner_id, runner_cap, slots in result.all()}


async def claim_batch(session: AsyncSession, candidates: Sequence[DispatchCandidate], *, now: datetime.datetime) -> list[tuple[Backup, Runner, Registry]]:
    """Move PENDING attempts to IN_PROGRESS, each only while its runner is under its cap.

    This write is the dispatch fence: of several managers that picked the same attempt, exactly
    one claims it, and only the winner calls the runner. On PostgreSQL the candidates' runner rows
    are locked first (in id order, so two claimers never deadlock) and their attempts in flight
    counted under that lock, so concurrent claimers never exceed a runner's cap together.
    Returns each claimed attempt with what sending it needs, in the candidates' order.
    """
    runner_ids = sorted({candidate.runner_id for candidate in candidates})
    if not runner_ids:
        return []
    if session.bind.dialect.name == "postgresql":
        await session.execute(sa.select(Runner.id).where(Runner.id.in_(runner_ids)).order_by(Runner.id).with_for_update())

    running = await session.execute(
        sa.select(Backup.runner_id, sa.func.count())
        .where(Backup.runner_id.in_(runner_ids), Backup.state == BackupState.IN_PROGRESS)
        .group_by(Backup.runner_id)
    )
    in_flight = {runner_id: count for runner_id, count in running.all()}
    chosen = []
    for candidate in candidates:
        if in_flight.get(candidate.runner_id, 0) < candidate.cap:
            in_flight[candidate.runner_id] = in_flight.get(candidate.runner_id, 0) + 1
            chosen.append(candidate)
    if not chosen:
        return []

    claim = (
        sa.update(Backup)
        .where(
            # The runner is part of the guard: the cap above was counted against it.
            sa.tuple_(Backup.id, Backup.version, Backup.runner_id).in_([(c.backup_id, c.backup_version, c.runner_id) for c in chosen]),
            Backup.state == BackupState.PENDING,
        )
        .values(
            state=BackupState.IN_PROGRESS,
            started_at=now,
            checked_at=now,
            updated_at=now,
            version=Backup.version + 1,
        )
        .returning(Backup.id)
    )
    claimed = set((await session.execute(claim, execution_options={"synchronize_session": False})).scalars())
    if not claimed:
        return []

    mirror = (
        sa.update(Sandbox)
        .where(Sandbox.current_backup_id.in_(claimed))
        .values(backup_state=SandboxBackupState.IN_PROGRESS, updated_at=now, version=Sandbox.version + 1)
    )
    await session.execute(mirror, execution_options={"synchronize_session": False})

    details = await session.execute(
        sa.select(Backup, Runner, Registry)
        .join(Runner, Runner.id == Backup.runner_id)
        .join(Registry, Registry.id == Backup.registry_id)
        .where(Backup.id.in_(claimed))
        .execution_options(populate_existing=True)
    )
    by_id = {row[0].id: (row[0], row[1], row[2]) for row in details.all()}
    return [by_id[c.backup_id] for c in chosen if c.backup_id in by_id]


async def mark_accepted(session: AsyncSession, backup_ids: Sequence[str], *, now: datetime.datetime) -> set[str]:
    """Record that the runner accepted these attempts; return those still open (the rest have ended)."""
    if not backup_ids:
        return set()
    statement = (
        sa.update(Backup)
        .where(Backup.id.in_(list(backup_ids)), Backup.state == BackupState.IN_PROGRESS, Backup.accepted_at.is_(None))
        .values(accepted_at=now, updated_at=now)
        .returning(Backup.id)
    )
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    return set(result.scalars())


async def touch_checked(session: AsyncSession, backup_id: str, *, now: datetime.datetime) -> None:
    statement = sa.update(Backup).where(Backup.id == backup_id, Backup.state == BackupState.IN_PROGRESS).values(checked_at=now)
    await session.execute(statement, execution_options={"synchronize_session": False})


async def in_progress_batch(session: AsyncSession, *, limit: int, quiet_since: datetime.datetime | None = None) -> list[tuple[Backup, Runner | None]]:
    """IN_PROGRESS attempts, least recently checked first; with `quiet_since`, only those not checked since then."""
    statement = sa.select(Backup, Runner).outerjoin(Runner, Runner.id == Backup.runner_id).where(Backup.state == BackupState.IN_PROGRESS)
    if quiet_since is not None:
        statement = statement.where(sa.or_(Backup.checked_at.is_(None), Backup.checked_at <= quiet_since))
    statement = statement.order_by(Backup.checked_at.asc().nulls_first(), Backup.id).limit(limit)
    result = await session.execute(statement)
    return [(row[0], row[1]) for row in result.all()]


async def find_awaited_for_runner(session: AsyncSession, *, runner_id: str, sandbox_id: str, image_ref: str) -> tuple[str | None, Backup | None]:
    """Return the runner's token (None for an unknown runner) and the open attempt that awaits `image_ref`.

    One statement serves both the report's authentication and its lookup.
    """
    awaited = sa.and_(
        Backup.runner_id == Runner.id,
        Backup.sandbox_id == sandbox_id,
        Backup.image_ref == image_ref,
        Backup.state.in_(OPEN_STATES),
    )
    statement = sa.select(Runner.token, Backup).select_from(Runner).outerjoin(Backup, awaited).where(Runner.id == runner_id)
    row = (await session.execute(statement)).first()
    return (None, None) if row is None else (row[0], row[1])


@dataclasses.dataclass(frozen=True)
class Completed:
    """An attempt just marked COMPLETED, and the state its sandbox was in (None: the sandbox is gone)."""

    sandbox_state: SandboxState | None


async def complete(
    session: AsyncSession, backup: Backup, *, digest: str | None, size_bytes: int | None, now: datetime.datetime, layer_count: int | None = None
) -> Completed | None:
    """Mark an open attempt COMPLETED with its manifest digest; None when it is no longer open."""
    done = await guards.guarded_update(
        session,
        Backup,
        backup.id,
        expected={"state": OPEN_STATES, "version": backup.version, "image_ref": backup.image_ref},
        values={
            "state": BackupState.COMPLETED,
            "manifest_digest": digest,
            "size_bytes": size_bytes,
            "layer_count": layer_count,
            "completed_at": now,
            "updated_at": now,
            "error_reason": None,
        },
        action="complete",
    )
    if not done:
        return None
    states = await mirror_completions(session, [backup], now=now)
    return Completed(states[backup.id])


async def mirror_completions(session: AsyncSession, completed: Sequence[Backup], *, now: datetime.datetime) -> dict[str, SandboxState | None]:
    """Show each completed attempt on its sandbox, and owe its deletion when the sandbox is being destroyed.

    Reads only `id`, `sandbox_id` and `started_at` of each attempt. Returns the sandbox's state
    by attempt id, None for a sandbox that is gone.
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


async def fail(
    session: AsyncSession,
    backup: Backup,
    *,
    reason: str,
    transient: bool,
    decision: RetryDecision,
    now: datetime.datetime,
) -> tuple[bool, Backup | None]:
    """End an open attempt in ERROR and, when `decision` allows one, queue the next attempt.

    Returns whether the attempt was failed here and the new PENDING attempt, if any.
    """
    failed = await guards.guarded_update(
        session,
        Backup,
        backup.id,
        expected={"state": OPEN_STATES, "version": backup.version},
        values={"state": BackupState.ERROR, "error_reason": reason, "error_transient": transient, "completed_at": now, "updated_at": now},
        action="fail",
    )
    if not failed:
        return False, None

    sandbox = await session.get(Sandbox, backup.sandbox_id, populate_existing=True)
    registry = await session.get(Registry, backup.registry_id)
    destroyed = sandbox is None or SandboxState.DESTROYED in (sandbox.state, sandbox.desired_state)
    if decision.retry and not destroyed and registry is not None and sandbox.current_backup_id == backup.id:
        retry = await _queue_retry(session, sandbox, backup, registry, decision=decision, now=now)
        if retry is not None:
            return True, retry

    await guards.guarded_update(
        session,
        Sandbox,
        backup.sandbox_id,
        expected={"current_backup_id": backup.id},
        values={"backup_state": SandboxBackupState.ERROR, "last_attempt_ended_at": now, "error_reason": reason, "updated_at": now},
        action="fail_on_sandbox",
    )
    return True, None


async def _queue_retry(
    session: AsyncSession, sandbox: Sandbox, failed: Backup, registry: Registry, *, decision: RetryDecision, now: datetime.datetime
) -> Backup | None:
    # The sandbox row still shows the failed attempt as current; release it so create_attempt's
    # guard (no attempt in flight) holds, then queue the next attempt with a fresh reference.
    released = await guards.guarded_update(
        session,
        Sandbox,
        sandbox.id,
        expected={"current_backup_id": failed.id, "version": sandbox.version},
        values={"backup_state": SandboxBackupState.ERROR, "last_attempt_ended_at": now, "error_reason": failed.error_reason, "updated_at": now},
        action="release_for_retry",
    )
    if not released:
        return None
    sandbox = await session.get(Sandbox, sandbox.id, populate_existing=True)
    assert sandbox is not None
    return await create_attempt(
        session, sandbox, registry=registry, trigger=failed.trigger, now=now, attempt=failed.attempt + 1, next_attempt_at=decision.next_attempt_at
    )


async def cancel_pending(session: AsyncSession, sandbox_id: str, *, reason: str, now: datetime.datetime) -> int:
    """End every PENDING attempt of a sandbox in ERROR without retry (the sandbox is going away)."""
    statement = (
        sa.update(Backup)
        .where(Backup.sandbox_id == sandbox_id, Backup.state == BackupState.PENDING)
        .values(state=BackupState.ERROR, error_reason=reason, error_transient=False, completed_at=now, updated_at=now, version=Backup.version + 1)
    )
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    if result.rowcount:
        mirror = (
            sa.update(Sandbox)
            .where(Sandbox.id == sandbox_id, Sandbox.backup_state == SandboxBackupState.PENDING)
            .values(backup_state=SandboxBackupState.ERROR, last_attempt_ended_at=now, updated_at=now, version=Sandbox.version + 1)
        )
        await session.execute(mirror, execution_options={"synchronize_session": False})
    return result.rowcount


async def in_progress_count(session: AsyncSession, sandbox_id: str) -> int:
    statement = sa.select(sa.func.count()).select_from(Backup).where(Backup.sandbox_id == sandbox_id, Backup.state == BackupState.IN_PROGRESS)
    return (await session.execute(statement)).scalar_one()


async def open_attempt_count(session: AsyncSession, sandbox_id: str) -> int:
    statement = sa.select(sa.func.count()).select_from(Backup).where(Backup.sandbox_id == sandbox_id, Backup.state.in_(OPEN_STATES))
    return (await session.execute(statement)).scalar_one()


async def mark_all_deleted(session: AsyncSession, sandbox_id: str, *, now: datetime.datetime) -> int:
    """Record that every kept backup of a sandbox is going away with its repository."""
    statement = (
        sa.update(Backup)
        .where(Backup.sandbox_id == sandbox_id, Backup.state == BackupState.COMPLETED, Backup.deleted_at.is_(None))
        .values(deleted_at=now, updated_at=now)
    )
    result = await session.execute(statement, execution_options={"synchronize_session": False})
    return result.rowcount
