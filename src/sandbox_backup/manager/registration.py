"""Recording many sandboxes in one call, as a platform does when it syncs or bootstraps its fleet.

The batch is all or nothing: every id and runner is checked first, and the sandboxes are written
in one transaction. Sandboxes whose state changed are then handled as single updates would be:
due backups are queued together in a second transaction, destroyed sandboxes one by one.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import SandboxState
from sandbox_backup.manager import lifecycle, scheduling
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import cleanup, fleet, sandboxes
from sandbox_backup.store.models import Sandbox
from sandbox_backup.store.sandboxes import SandboxFields

logger = logging.getLogger(__name__)

MAX_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class BatchResult:
    recorded: int
    created: int
    backups_queued: int


async def upsert_sandboxes(ctx: ManagerContext, items: Sequence[tuple[str, SandboxFields]]) -> BatchResult:
    """Record the platform's view of each listed sandbox and act on state changes.

    Raises InvalidInput for a bad or repeated id or an oversized batch, and NotFound for an
    unknown runner. Raises Conflict when a listed sandbox changed meanwhile, or is a destroyed one
    whose backups are still being deleted. Nothing is written in any of these cases.
    """
    _check_batch(items)
    now = ctx.now()
    async with ctx.db.transaction() as session:
        await _check_runners(session, items)
        known = await sandboxes.get_sandboxes(session, [sandbox_id for sandbox_id, _ in items])
        new = [(sandbox_id, fields) for sandbox_id, fields in items if sandbox_id not in known]
        await sandboxes.insert_sandboxes(session, new, now=now)
        for sandbox_id, fields in items:
            if sandbox_id in known:
                await _update_known(session, known[sandbox_id], fields, now=now)

    changed = [(sandbox_id, fields.state) for sandbox_id, fields in items if sandbox_id not in known or known[sandbox_id].state != fields.state]
    logger.info(
        "sandboxes recorded",
        extra={"action": "sandboxes_upserted", "sandboxes_recorded": len(items), "sandboxes_created": len(new), "state_changes": len(changed)},
    )

    for sandbox_id, state in changed:
        if state == SandboxState.DESTROYED:
            await lifecycle.on_destroyed(ctx, sandbox_id)
    queued = await _queue_due(ctx, [sandbox_id for sandbox_id, state in changed if state != SandboxState.DESTROYED])
    return BatchResult(recorded=len(items), created=len(new), backups_queued=queued)


def _check_batch(items: Sequence[tuple[str, SandboxFields]]) -> None:
    if len(items) > MAX_BATCH:
        raise errors.InvalidInput(f"invalid batch: {len(items)} sandboxes, the limit is {MAX_BATCH}; split it into smaller batches")
    seen: set[str] = set()
    for sandbox_id, _ in items:
        reference.validate_sandbox_id(sandbox_id)
        if sandbox_id in seen:
            raise errors.InvalidInput(f"sandbox {sandbox_id!r} is listed twice in the batch; list each sandbox once")
        seen.add(sandbox_id)


async def _check_runners(session: AsyncSession, items: Sequence[tuple[str, SandboxFields]]) -> None:
    requested = {fields.runner_id for _, fields in items if fields.runner_id is not None}
    known = {runner.id for runner in await fleet.list_runners(session)} if requested else set()
    missing = sorted(requested - known)
    if missing:
        raise errors.NotFound(f"runner {missing[0]!r} is not registered; register it first with PUT /api/v1/runners/{missing[0]}")


async def _update_known(session: AsyncSession, sandbox: Sandbox, fields: SandboxFields, *, now: datetime.datetime) -> None:
    if sandbox.state == SandboxState.DESTROYED and fields.state != SandboxState.DESTROYED:
        # The same rule as a single registration: a reused id waits until the old repository is empty.
        if await cleanup.owed_count(session, sandbox_id=sandbox.id):
            raise errors.Conflict(f"sandbox {sandbox.id!r} was destroyed and its backups are still being deleted; register it again after that")
    if not await sandboxes.update_sandbox(session, sandbox, fields, now=now):
        raise errors.Conflict(f"sandbox {sandbox.id!r} changed while the batch was recorded; send the batch again")


async def _queue_due(ctx: ManagerContext, sandbox_ids: list[str]) -> int:
    if not sandbox_ids:
        return 0
    now = ctx.now()
    async with ctx.db.transaction() as session:
        rows = await sandboxes.due_rows(session, sandbox_ids)
        registries = await fleet.list_registries(session)
        queued = await scheduling.queue_due_batch(ctx, session, rows, registries, now=now)
    if queued:
        ctx.wake_dispatch.set()
    return len(queued)
