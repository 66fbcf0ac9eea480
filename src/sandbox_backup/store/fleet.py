"""Queries on runners and registries."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup.domain.states import RestorePurpose, RestoreState, RunnerState, SandboxState
from sandbox_backup.store import guards
from sandbox_backup.store.models import Registry, Restore, Runner, Sandbox

# States in which a sandbox occupies a slot of its runner's capacity.
OCCUPYING_STATES = (SandboxState.STARTED, SandboxState.STOPPED, SandboxState.ARCHIVING, SandboxState.RESTORING)


async def upsert_runner(
    session: AsyncSession,
    *,
    runner_id: str,
    api_url: str,
    token: str,
    now: datetime.datetime,
    state: RunnerState = RunnerState.READY,
    region: str | None = None,
    capacity: int = 100,
    max_concurrent_backups: int | None = None,
) -> Runner:
    """Register a runner, or replace the settings of a registered one."""
    runner = await session.get(Runner, runner_id, with_for_update=session.bind.dialect.name == "postgresql")
    if runner is None:
        runner = Runner(id=runner_id, created_at=now, version=1, failed_probes=0)
        session.add(runner)
    else:
        runner.version += 1
    if state == RunnerState.DRAINING and runner.state != RunnerState.DRAINING:
        runner.drain_started_at = now
    runner.api_url = api_url
    runner.token = token
    runner.state = state
    runner.region = region
    runner.capacity = capacity
    runner.max_concurrent_backups = max_concurrent_backups
    runner.updated_at = now
    await session.flush()
    return runner


async def get_runner(session: AsyncSession, runner_id: str) -> Runner | None:
    return await session.get(Runner, runner_id)


async def list_runners(session: AsyncSession) -> list[Runner]:
    result = await session.execute(sa.select(Runner).order_by(Runner.id))
    return list(result.scalars())


async def record_probe(session: AsyncSession, runner: Runner, *, answered: bool, now: datetime.datetime, unresponsive_after: int) -> RunnerState | None:
    """Record one health probe; return the new state when the probe changed it.

    Only READY and UNRESPONSIVE move here: NOT_READY and DRAINING are the operator's to set.
    """
    if answered:
        values: dict[str, object] = {"failed_probes": 0, "last_seen_at": now}
        new_state = RunnerState.READY if runner.state == RunnerState.UNRESPONSIVE else None
    else:
        failed = runner.failed_probes + 1
        values = {"failed_probes": failed}
        new_state = RunnerState.UNRESPONSIVE if runner.state == RunnerState.READY and failed >= unresponsive_after else None
    if new_state is not None:
        values["state"] = new_state
        values["updated_at"] = now

    changed = await guards.guarded_update(
        session, Runner, runner.id, expected={"version": runner.version, "state": runner.state}, values=values, action="record_probe"
    )
    return new_state if changed else None


async def mark_seen(session: AsyncSession, runner_ids: Sequence[str], *, now: datetime.datetime, older_than: datetime.datetime) -> None:
    """Set `last_seen_at` of the runners among `runner_ids` whose value is older than `older_than`."""
    statement = (
        sa.update(Runner)
        .where(Runner.id.in_(sorted(runner_ids)), sa.or_(Runner.last_seen_at.is_(None), Runner.last_seen_at < older_than))
        .values(last_seen_at=now)
    )
    await session.execute(statement, execution_options={"synchronize_session": False})


async def upsert_registry(
    session: AsyncSession,
    *,
    registry_id: str,
    url: str,
    now: datetime.datetime,
    project: str | None = None,
    username: str | None = None,
    password: str | None = None,
    region: str | None = None,
    organization_id: str | None = None,
    is_default: bool = False,
) -> Registry:
    """Register a registry, or replace the settings of a registered one."""
    registry = await session.get(Registry, registry_id)
    if registry is None:
        registry = Registry(id=registry_id, created_at=now)
        session.add(registry)
    registry.url = url
    registry.project = project
    registry.username = username
    registry.password = password
    registry.region = region
    registry.organization_id = organization_id
    registry.is_default = is_default
    registry.updated_at = now
    await session.flush()
    return registry


async def get_registry(session: AsyncSession, registry_id: str) -> Registry | None:
    return await session.get(Registry, registry_id)


async def list_registries(session: AsyncSession) -> list[Registry]:
    result = await session.execute(sa.select(Registry).order_by(Registry.id))
    return list(result.scalars())


async def choose_backup_registry(session: AsyncSession, *, organization_id: str | None, region: str | None) -> Registry | None:
    """Pick where a sandbox's first backup goes; see `pick_backup_registry`."""
    return pick_backup_registry(await list_registries(session), organization_id=organization_id, region=region)


def pick_backup_registry(registries: Sequence[Registry], *, organization_id: str | None, region: str | None) -> Registry | None:
    """Pick where a sandbox's first backup goes, from every registered registry.

    Order: a registry of the sandbox's organization in its region, then one of its organization
    with no region, then the region's default, then a default with no region; the lowest id wins
    a tie. Registries of other organizations are never chosen, so their credentials never travel
    with this sandbox.
    """
    own = [r for r in registries if organization_id is not None and r.organization_id == organization_id]
    shared_defaults = [r for r in registries if r.organization_id is None and r.is_default]
    preferences = [
        [r for r in own if r.region == region],
        [r for r in own if r.region is None],
        [r for r in shared_defaults if region is not None and r.region == region],
        [r for r in shared_defaults if r.region is None],
    ]
    for matches in preferences:
        if matches:
            return min(matches, key=lambda r: r.id)
    return None


async def choose_restore_runner(session: AsyncSession, *, region: str | None, exclude: set[str], ignore_restore_id: str | None = None) -> Runner | None:
    """Return the least loaded READY runner (in `region` when set) with a free slot, outside `exclude`.

    Load counts the sandboxes on a runner plus the restores on their way to it.
    """
    residents = sa.select(Sandbox.runner_id.label("runner_id")).where(Sandbox.state.in_(OCCUPYING_STATES), Sandbox.state != SandboxState.RESTORING)
    arriving = sa.select(Restore.runner_id.label("runner_id")).where(
        Restore.state.in_([RestoreState.PENDING.value, RestoreState.RUNNING.value]),
        Restore.purpose != RestorePurpose.DRILL.value,
        Restore.runner_id.is_not(None),
        Restore.id != (ignore_restore_id or ""),
    )
    everyone = sa.union_all(residents, arriving).subquery()
    load = sa.select(everyone.c.runner_id, sa.func.count().label("n")).group_by(everyone.c.runner_id).subquery()
    used = sa.func.coalesce(load.c.n, 0)
    statement = (
        sa.select(Runner)
        .outerjoin(load, load.c.runner_id == Runner.id)
        .where(Runner.state == RunnerState.READY, used < Runner.capacity)
        .order_by(used, Runner.id)
    )
    if region is not None:
        statement = statement.where(Runner.region == region)
    if exclude:
        statement = statement.where(Runner.id.not_in(list(exclude)))
    return (await session.execute(statement.limit(1))).scalar_one_or_none()
