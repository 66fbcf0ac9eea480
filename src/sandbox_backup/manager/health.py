"""Runner health probes: a READY runner that stops answering becomes UNRESPONSIVE, and back."""

from __future__ import annotations

import asyncio
import datetime
import logging

from sandbox_backup.domain.states import RunnerState
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.store import fleet
from sandbox_backup.store.models import Runner

logger = logging.getLogger(__name__)

# How stale `last_seen_at` may get before an answered probe writes it again. Without this, a
# thousand healthy runners probed every 15 s would cost some 70 database writes a second.
LAST_SEEN_RESOLUTION = datetime.timedelta(seconds=60)


async def probe_runners(ctx: ManagerContext) -> int:
    """Probe every runner once, except those a recent backup proved healthy; return how many changed state."""
    async with ctx.db.transaction() as session:
        runners = await fleet.list_runners(session)
    due = [runner for runner in runners if not _recently_proven(ctx, runner)]

    # A few workers take the runners in turn. One task per runner, all queued on the shared
    # runner-call semaphore, costs more CPU than the probes, because each acquire scans the waiters.
    changes: list[bool] = []

    async def work() -> None:
        while due:
            changes.append(await _probe(ctx, due.pop()))

    workers = max(1, ctx.settings.runner_call_concurrency // 2)
    await asyncio.gather(*(work() for _ in range(min(workers, len(due)))))
    return sum(1 for changed in changes if changed)


def _recently_proven(ctx: ManagerContext, runner: Runner) -> bool:
    """Return True when the runner accepted a backup within one probe interval and a probe would record nothing."""
    accepted_at = ctx.runner_accepted_at.get(runner.id)
    if accepted_at is None:
        return False
    now = ctx.now()
    recent = now - accepted_at < datetime.timedelta(seconds=ctx.settings.runner_health_interval_s)
    return recent and _nothing_to_record(runner, now)


async def _probe(ctx: ManagerContext, runner: Runner) -> bool:
    async with ctx.runner_calls:
        answered = await ctx.runner_client(runner).health()
    ctx.metrics.runner_probes.labels(runner.id, "answered" if answered else "unanswered").inc()
    if answered and _nothing_to_record(runner, ctx.now()):
        return False
    async with ctx.db.transaction() as session:
        new_state = await fleet.record_probe(session, runner, answered=answered, now=ctx.now(), unresponsive_after=ctx.settings.runner_unresponsive_after)
    if new_state is not None:
        level = logging.INFO if answered else logging.WARNING
        logger.log(level, "runner state changed after a health probe", extra={"action": "runner_state_changed", "runner_id": runner.id, "to_state": new_state.value})
    return new_state is not None


def _nothing_to_record(runner: Runner, now: datetime.datetime) -> bool:
    """Whether an answered probe would change nothing but a recent `last_seen_at`."""
    healthy = runner.failed_probes == 0 and runner.state != RunnerState.UNRESPONSIVE
    return healthy and runner.last_seen_at is not None and now - runner.last_seen_at < LAST_SEEN_RESOLUTION
