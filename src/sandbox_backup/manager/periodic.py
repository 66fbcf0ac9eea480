"""A periodic job: runs its body every interval, or at once when woken, on one replica at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sandbox_backup.coordination import keys
from sandbox_backup.coordination.base import Coordinator, LockNotAcquired
from sandbox_backup.metrics import ManagerMetrics

logger = logging.getLogger(__name__)


class PeriodicJob:
    """Run `body` every `interval_s`, or sooner when `wake` is set.

    A replica runs the body only while it holds the job's lock, so each periodic job runs on one
    replica at a time; a replica that finds the lock taken skips that tick.
    """

    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[int]],
        *,
        interval_s: float,
        coordinator: Coordinator,
        wake: asyncio.Event | None = None,
        lock_ttl_s: float | None = None,
        metrics: ManagerMetrics | None = None,
        wake_delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.body = body
        self.interval_s = interval_s
        self.coordinator = coordinator
        self.wake = wake or asyncio.Event()
        self.lock_ttl_s = lock_ttl_s or max(30.0, interval_s * 3)
        self.metrics = metrics
        # After a wake-up, wait this long first, so wake-ups that come in a burst share one run.
        self.wake_delay_s = wake_delay_s
        # Set by request_stop(): no new tick starts, and a body that is running may finish.
        self.stopping = False
        self.body_running = False

    async def run_forever(self) -> None:
        """Run ticks until request_stop(); return after the body that was running has ended."""
        logger.info("periodic job started", extra={"action": "job_started", "job": self.name, "interval_s": self.interval_s})
        while not self.stopping:
            await self.run_once()
            await self._sleep()

    def request_stop(self) -> None:
        """Start no new tick, and end a sleep at once so `run_forever` returns."""
        self.stopping = True
        self.wake.set()

    async def run_once(self) -> int | None:
        """Run the body once if this replica gets the lock; return what it handled, or None.

        Returns None without running the body after request_stop().
        """
        if self.stopping:
            return None
        started = time.monotonic()
        try:
            # Leaving the block releases the lock, also when a shutdown cancels the body.
            async with self.coordinator.hold(keys.job_lock_name(self.name), ttl_s=self.lock_ttl_s, renew=True):
                self.body_running = True
                try:
                    handled = await self.body()
                finally:
                    self.body_running = False
                if self.metrics is not None:
                    self.metrics.job_duration.labels(self.name).observe(time.monotonic() - started)
        except LockNotAcquired:
            if self.metrics is not None:
                self.metrics.job_skipped.labels(self.name).inc()
            return None
        except asyncio.CancelledError:
            raise
        except Exception:
            if self.metrics is not None:
                self.metrics.job_failures.labels(self.name).inc()
            logger.exception("periodic job failed; it runs again at its next tick", extra={"action": "job_failed", "job": self.name})
            return None

        if handled:
            elapsed_ms = (time.monotonic() - started) * 1000
            logger.debug("periodic job ran", extra={"action": "job_ran", "job": self.name, "handled": handled, "duration_ms": round(elapsed_ms, 1)})
        return handled

    async def _sleep(self) -> None:
        if self.stopping:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=self.interval_s)
            if self.wake_delay_s and not self.stopping:
                await asyncio.sleep(self.wake_delay_s)
        self.wake.clear()
