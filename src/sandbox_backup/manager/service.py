"""The backup manager: builds its parts, runs its periodic jobs, and exposes what the API calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import httpx

from sandbox_backup.clock import Clock, SystemClock
from sandbox_backup.config import Settings
from sandbox_backup.coordination.base import Coordinator
from sandbox_backup.coordination.factory import create_coordinator
from sandbox_backup.manager import archive, cleanup, dispatch, drain, health, restore, retention, scheduling, tracking, verification
from sandbox_backup.manager.context import ManagerContext
from sandbox_backup.manager.periodic import PeriodicJob
from sandbox_backup.metrics import ManagerMetrics
from sandbox_backup.store import database
from sandbox_backup.store.transaction import Database

logger = logging.getLogger(__name__)

# Completions of a wave wake the dispatcher hundreds of times a second; 50 ms lets one pass
# fill the slots they freed together, at a cost of 50 ms on a dispatch.
DISPATCH_WAKE_DELAY_S = 0.05


class BackupManager:
    """One manager replica. Several may share a PostgreSQL database and a Redis."""

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.jobs = [
            PeriodicJob("due-check-running", self.check_running_due, interval_s=settings.due_check_interval_s, coordinator=ctx.coordinator),
            PeriodicJob("due-check-stopped", self.check_stopped_due, interval_s=settings.stopped_check_interval_s, coordinator=ctx.coordinator),
            PeriodicJob(
                "dispatch",
                self.dispatch_pending,
                interval_s=settings.dispatch_interval_s,
                coordinator=ctx.coordinator,
                wake=ctx.wake_dispatch,
                wake_delay_s=DISPATCH_WAKE_DELAY_S,
            ),
            PeriodicJob("progress", self.sync_progress, interval_s=settings.progress_interval_s, coordinator=ctx.coordinator),
            PeriodicJob("runner-health", self.probe_runners, interval_s=settings.runner_health_interval_s, coordinator=ctx.coordinator),
            PeriodicJob("cleanup", self.work_cleanup, interval_s=settings.cleanup_interval_s, coordinator=ctx.coordinator, wake=ctx.wake_cleanup),
            PeriodicJob("restore", self.run_restores, interval_s=settings.restore_interval_s, coordinator=ctx.coordinator, wake=ctx.wake_restore, lock_ttl_s=60.0),
            PeriodicJob("archive", self.finish_archives, interval_s=settings.archive_interval_s, coordinator=ctx.coordinator, wake=ctx.wake_archive),
            PeriodicJob("drain", self.work_drains, interval_s=settings.drain_interval_s, coordinator=ctx.coordinator),
            PeriodicJob("retention", self.prune, interval_s=settings.retention_interval_s, coordinator=ctx.coordinator),
            PeriodicJob("verification", self.verify, interval_s=settings.verify_interval_s, coordinator=ctx.coordinator),
        ]
        for job in self.jobs:
            job.metrics = ctx.metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False

    # Periodic job bodies; tests call them directly with a manual clock.
    async def check_running_due(self) -> int:
        return await scheduling.check_running_due(self.ctx)

    async def check_stopped_due(self) -> int:
        return await scheduling.check_stopped_due(self.ctx)

    async def dispatch_pending(self) -> int:
        return await dispatch.dispatch_pending(self.ctx)

    async def sync_progress(self) -> int:
        return await tracking.sync_progress(self.ctx)

    async def probe_runners(self) -> int:
        return await health.probe_runners(self.ctx)

    async def work_cleanup(self) -> int:
        return await cleanup.work_cleanup(self.ctx)

    async def run_restores(self) -> int:
        return await restore.run_due_restores(self.ctx)

    async def finish_archives(self) -> int:
        return await archive.finish_archives(self.ctx)

    async def work_drains(self) -> int:
        return await drain.work_drains(self.ctx)

    async def prune(self) -> int:
        return await retention.prune_all(self.ctx)

    async def verify(self) -> int:
        return await verification.verify_due(self.ctx)

    async def start(self) -> None:
        """Run the due checks once, then start every periodic job."""
        logger.info("manager starting", extra={"action": "manager_starting"})
        for job in self.jobs[:2]:
            await job.run_once()
        self._tasks = [asyncio.create_task(job.run_forever(), name=f"job:{job.name}") for job in self.jobs]
        logger.info("manager started", extra={"action": "manager_started", "jobs": [job.name for job in self.jobs]})

    @property
    def draining(self) -> bool:
        """Whether stop() has begun: the served API then rejects mutating calls, and no job starts a new tick."""
        return self._draining

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the periodic jobs, giving job bodies that are running `grace_s` seconds to finish.

        `grace_s` defaults to the `shutdown_grace_s` setting. Bodies still running at the
        deadline are cancelled, which releases their job locks. Attempts in flight stay
        recorded in the database, and the next manager's progress job picks them up.
        """
        self._draining = True
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        grace_s = self.ctx.settings.shutdown_grace_s if grace_s is None else grace_s
        running = [job.name for job in self.jobs if job.body_running]
        logger.info(
            "manager stopping: %d job(s) running, waiting up to %.0f s for them",
            len(running),
            grace_s,
            extra={"action": "manager_stopping", "jobs_running": running, "grace_s": grace_s},
        )
        for job in self.jobs:
            job.request_stop()
        try:
            await asyncio.wait(tasks, timeout=grace_s)
        finally:
            # Also runs when the caller cancels stop(), such as on a second signal.
            cancelled = [job.name for job in self.jobs if job.body_running]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        logger.info(
            "manager stopped: %d job(s) cancelled at the deadline",
            len(cancelled),
            extra={"action": "manager_stopped", "jobs_cancelled": cancelled},
        )

    async def aclose(self) -> None:
        await self.stop()
        await self.ctx.close_http()
        await self.ctx.coordinator.aclose()
        await self.ctx.db.dispose()


async def open_manager(
    settings: Settings,
    *,
    clock: Clock | None = None,
    coordinator: Coordinator | None = None,
    rng: random.Random | None = None,
    metrics: ManagerMetrics | None = None,
) -> BackupManager:
    """Connect to the database (applying migrations) and the coordinator, and build a manager."""
    engine = database.create_engine(settings.effective_database_url(), pre_ping=settings.database_pre_ping)
    await database.migrate(engine)
    coordinator = coordinator or create_coordinator(settings.coordination_url)
    await coordinator.ping()
    limits = httpx.Limits(max_connections=settings.runner_call_concurrency * 2, max_keepalive_connections=settings.runner_call_concurrency)
    ctx = ManagerContext(
        settings=settings,
        db=Database(engine),
        coordinator=coordinator,
        clock=clock or SystemClock(),
        http=httpx.AsyncClient(limits=limits),
        rng=rng or random.Random(),
        metrics=metrics or ManagerMetrics(),
    )
    return BackupManager(ctx)
