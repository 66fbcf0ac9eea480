"""Scheduling and cleanup under bad registries, empty organizations and a clock that steps back.

Each test here fails today because of a product bug; the comment above each assert states the
correct behaviour.
"""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from sandbox_backup.domain.states import SandboxBackupState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store.models import CleanupTask
from tests.breaker.helpers import DIGEST, claim_all, cleanup_tasks, get_sandbox, history, post_report
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


async def test_bad_registry_starves_due_check(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    # The API accepts a project that cannot form an OCI repository name (see test_api_inputs).
    registered = await api.put("/api/v1/registries/org-a", json={"url": "http://127.0.0.1:9", "project": "Bad Project", "organizationId": "org-a"})
    assert registered.status_code == 200
    await add_sandbox(manager, "a-sb", runner_id="r1", organization_id="org-a")
    await add_sandbox(manager, "b-sb", runner_id="r1", organization_id="org-b")

    # Correct: one sandbox whose registry is misconfigured is logged and skipped, and the rest of
    # the fleet is still queued. Today InvalidReference escapes _queue_due on "a-sb", the pass
    # ends there, and every later tick fails the same way: "b-sb" is never backed up.
    queued = await manager.check_running_due()
    assert queued == 1
    assert (await get_sandbox(manager, "b-sb")).backup_state == SandboxBackupState.PENDING


async def test_empty_organization_never_backed_up(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)

    # SandboxIn documents organizationId as "Empty for a warm-pool sandbox, which is never backed
    # up", and docs/architecture.md states "empty means a warm-pool sandbox".
    response = await api.put("/api/v1/sandboxes/warm-1", json={"state": "STARTED", "runnerId": "r1", "organizationId": ""})
    assert response.status_code == 200

    # Correct: nothing is queued. Today only None counts as "no organization", so "" is backed up.
    assert await manager.check_running_due() == 0


async def test_stop_after_clock_step_back(manager: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await manager.check_running_due()
    clock.advance(30)
    await claim_all(manager)

    # The wall clock steps back 20 s (an NTP correction, or a replica whose clock runs behind
    # the one that claimed). The sandbox then stops, after the dispatch in real order.
    clock.advance(-20)
    stopped = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "stopped"})
    assert stopped.status_code == 200
    attempt = (await history(manager, "sb-1"))[0]
    completed = await post_report(api, "r1", {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": DIGEST})
    assert completed.json() == {"accepted": True}

    # Correct: the backup was dispatched before the stop, so it does not cover the stopped state
    # and the stopped check queues one more. Today the check compares wall-clock stamps
    # (started_at 12:00:30 >= state_changed_at 12:00:10), counts the stop as covered, and the
    # stopped sandbox is never backed up after it stopped, even hours later.
    clock.advance(3600)
    assert await manager.check_stopped_due() == 1


async def test_cleanup_backoff_overflows(manager: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_runner(manager, "r1")
    await add_registry(manager)  # 127.0.0.1:9 refuses connections: every deletion fails
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await manager.check_running_due()
    assert (await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "destroyed"})).status_code == 200

    # 1024 failed deletions: about 43 days of an unreachable registry at the default 1 h cap,
    # less with a smaller retry_max_delay_s. Driving work_cleanup that often takes about 10 s,
    # so the counter is set directly. Calling work_cleanup 1024 times reaches the same state.
    async with manager.ctx.db.transaction() as session:
        await session.execute(sa.update(CleanupTask).where(CleanupTask.sandbox_id == "sb-1").values(attempts=1024))

    # Correct: the task is postponed by at most retry_max_delay_s like every other failure.
    # Today RetryPolicy.delay_s computes base * 2**1024, float() of that raises OverflowError,
    # the task is never postponed, and the cleanup job fails on it at every tick, so no other
    # owed deletion behind it runs either.
    await manager.work_cleanup()
    task = (await cleanup_tasks(manager, "sb-1"))[0]
    assert task.attempts == 1025
    assert task.not_before > clock.now()
