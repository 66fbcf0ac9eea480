"""Draining a runner: no new sandboxes land on it, each of its sandboxes gets a fresh backup, and
stopped ones then move to other runners (restore elsewhere, then remove the old copy)."""

from __future__ import annotations

import dataclasses
import logging

from sandbox_backup import errors
from sandbox_backup.domain.states import BackupTrigger, RestorePurpose, RunnerState, SandboxBackupState, SandboxState
from sandbox_backup.manager import restore as restore_flow
from sandbox_backup.manager import scheduling
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import fleet, restores, sandboxes
from sandbox_backup.store.models import Runner, Sandbox

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DrainProgress:
    runner_id: str
    state: RunnerState
    drain_started_at: str | None
    sandboxes: int
    backed_up: int
    moving: int
    remaining: int


def _fresh(sandbox: Sandbox, runner: Runner) -> bool:
    started = sandbox.last_backup_started_at
    return started is not None and runner.drain_started_at is not None and started > runner.drain_started_at


async def work_drains(ctx: ManagerContext) -> int:
    """Queue fresh backups and moves for every draining runner; return how many actions were taken."""
    async with ctx.db.transaction() as session:
        draining = [r for r in await fleet.list_runners(session) if r.state == RunnerState.DRAINING]
    actions = 0
    for runner in draining:
        actions += await _work_runner(ctx, runner)
    return actions


async def _work_runner(ctx: ManagerContext, runner: Runner) -> int:
    async with ctx.db.transaction() as session:
        residents = await sandboxes.on_runner(session, runner.id)
    actions = 0
    for sandbox in residents:
        if sandbox.ephemeral or sandbox.organization_id is None:
            continue
        if not _fresh(sandbox, runner) and sandbox.backup_state not in (SandboxBackupState.PENDING, SandboxBackupState.IN_PROGRESS):
            if await scheduling.queue_backup(ctx, sandbox.id, BackupTrigger.DRAIN, wait_for_lock=False) is not None:
                actions += 1
                ctx.wake_dispatch.set()
        elif _fresh(sandbox, runner) and sandbox.state == SandboxState.STOPPED:
            actions += await _move(ctx, sandbox)
    return actions


async def _move(ctx: ManagerContext, sandbox: Sandbox) -> int:
    try:
        # Only the fresh backup may be used: an older one would lose what was written since.
        await restore_flow.request_restore(ctx, sandbox.id, backup_id=sandbox.current_backup_id, purpose=RestorePurpose.MOVE)
    except errors.SandboxBackupError as exc:
        logger.warning("could not start moving a stopped sandbox off a draining runner", extra={"action": "drain_move_failed", "sandbox_id": sandbox.id, "runner_id": sandbox.runner_id, "error": str(exc)})
        return 0
    return 1


async def progress(ctx: ManagerContext, runner_id: str) -> DrainProgress:
    async with ctx.db.transaction() as session:
        runner = await fleet.get_runner(session, runner_id)
        if runner is None:
            raise errors.NotFound(f"runner {runner_id!r} is not registered")
        residents = await sandboxes.on_runner(session, runner_id)
        moving = [s for s in residents if await restores.open_for_sandbox(session, s.id, purposes=(RestorePurpose.MOVE,)) is not None]
    backed_up = sum(1 for s in residents if _fresh(s, runner))
    return DrainProgress(
        runner_id=runner_id,
        state=runner.state,
        drain_started_at=runner.drain_started_at.isoformat() if runner.drain_started_at else None,
        sandboxes=len(residents),
        backed_up=backed_up,
        moving=len(moving),
        remaining=len(residents) - backed_up,
    )
