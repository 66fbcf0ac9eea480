"""PeriodicJob wake-ups: a burst of wake-ups within the wake delay leads to one run."""

from __future__ import annotations

import asyncio

from sandbox_backup.coordination.memory import MemoryCoordinator
from sandbox_backup.manager.periodic import PeriodicJob


async def test_burst_of_wakeups_shares_one_run() -> None:
    runs = 0

    async def body() -> int:
        nonlocal runs
        runs += 1
        return 1

    job = PeriodicJob("burst", body, interval_s=60.0, coordinator=MemoryCoordinator(), wake_delay_s=0.2)
    task = asyncio.create_task(job.run_forever())
    await asyncio.sleep(0.05)
    assert runs == 1  # the first tick runs at once

    # Ten wake-ups 10 ms apart, all within the delay of the first.
    for _ in range(10):
        job.wake.set()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.4)
    assert runs == 2

    job.request_stop()
    await asyncio.wait_for(task, timeout=2.0)
