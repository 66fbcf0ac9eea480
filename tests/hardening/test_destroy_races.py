"""Destroyed sandboxes: no attempt may outlive the destroy, and the owed deletion must run."""

from __future__ import annotations

import httpx

from sandbox_backup.domain.states import BackupState, SandboxState
from sandbox_backup.manager import lifecycle, scheduling
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import sandboxes
from tests.hardening.helpers import claim_all, cleanup_tasks, get_sandbox, history, open_attempts, post_report
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


async def _one_sandbox(manager: BackupManager, registry_url: str) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager, url=registry_url)
    await add_sandbox(manager, "sb-1", runner_id="r1")


async def test_retry_after_destroy_blocks_cleanup(manager: BackupManager, api: httpx.AsyncClient, open_registry_server) -> None:  # type: ignore[no-untyped-def]
    await _one_sandbox(manager, open_registry_server.url)
    await manager.check_running_due()
    await claim_all(manager)
    attempt = (await history(manager, "sb-1"))[0]

    # The platform destroys the sandbox while its backup runs. The runner then reports the push
    # as failed and recoverable, as it does when the container is removed under the push.
    response = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "destroyed"})
    assert response.status_code == 200
    failure = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "FAILED", "error": "container removed", "recoverable": True}
    assert (await post_report(api, "r1", failure)).status_code == 202

    # A destroyed sandbox is never backed up again, so the failure queues no retry.
    assert [b.state for b in await history(manager, "sb-1")] == [BackupState.ERROR]
    assert await open_attempts(manager, "sb-1") == 0

    # Cleanup waits while an attempt is open. With none left, the owed repository deletion runs.
    await manager.work_cleanup()
    tasks = await cleanup_tasks(manager, "sb-1")
    assert [task.done_at is not None for task in tasks] == [True]


async def test_backup_request_racing_destroy(manager: BackupManager, api: httpx.AsyncClient, open_registry_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    await _one_sandbox(manager, open_registry_server.url)

    # Force the interleaving that asyncio.gather(destroyed event, backup request) produces on
    # SQLite every time. request_backup has checked the sandbox, then the destroy event runs to
    # its end, then queue_backup runs, so it must check the sandbox again under the sandbox lock.
    original_queue_backup = scheduling.queue_backup

    async def destroy_then_queue(ctx, sandbox_id, trigger, *, wait_for_lock):  # type: ignore[no-untyped-def]
        await lifecycle.handle_event(ctx, sandbox_id, lifecycle.LifecycleEvent.DESTROYED)
        return await original_queue_backup(ctx, sandbox_id, trigger, wait_for_lock=wait_for_lock)

    monkeypatch.setattr(scheduling, "queue_backup", destroy_then_queue)
    response = await api.post("/api/v1/sandboxes/sb-1/backup")
    monkeypatch.setattr(scheduling, "queue_backup", original_queue_backup)

    assert (await get_sandbox(manager, "sb-1")).state == SandboxState.DESTROYED
    # Nothing is queued for the destroyed sandbox and the request gets a 409 response.
    assert await open_attempts(manager, "sb-1") == 0
    assert response.status_code == 409


async def test_due_check_racing_destroy(manager: BackupManager, open_registry_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    await _one_sandbox(manager, open_registry_server.url)

    # The destroy event lands between the due scan (which saw a STARTED sandbox) and the queue
    # step: the scan's rows are read first, the destroy runs, then the due check queues from them.
    async with manager.ctx.db.transaction() as session:
        stale = await sandboxes.running_due_candidates(session, now=manager.ctx.now(), interval=manager.ctx.backup_interval, limit=10)
    assert [sandbox.id for sandbox, _ in stale] == ["sb-1"]
    await lifecycle.handle_event(manager.ctx, "sb-1", lifecycle.LifecycleEvent.DESTROYED)

    async def stale_scan(session, *, now, interval, limit):  # type: ignore[no-untyped-def]
        return stale

    monkeypatch.setattr(sandboxes, "running_due_candidates", stale_scan)
    assert await manager.check_running_due() == 0

    # No attempt exists for the destroyed sandbox; it never had a backup, so nothing is owed.
    assert await open_attempts(manager, "sb-1") == 0
    assert await history(manager, "sb-1") == []
    await manager.work_cleanup()
    assert all(task.done_at is not None for task in await cleanup_tasks(manager, "sb-1"))


async def test_destroy_leaves_backup_state_pending(manager: BackupManager, api: httpx.AsyncClient, open_registry_server) -> None:  # type: ignore[no-untyped-def]
    await _one_sandbox(manager, open_registry_server.url)
    await manager.check_running_due()

    response = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "destroyed"})
    assert response.status_code == 200
    body = response.json()
    current = (await history(manager, "sb-1"))[0]
    assert current.id == body["currentBackupId"]
    assert current.state == BackupState.ERROR

    # The sandbox shows its current attempt's state, here ERROR because the destroy cancelled it.
    assert body["backupState"] == "ERROR"


async def test_event_after_destroy_revives_state(manager: BackupManager, api: httpx.AsyncClient, open_registry_server) -> None:  # type: ignore[no-untyped-def]
    await _one_sandbox(manager, open_registry_server.url)
    assert (await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "destroyed"})).status_code == 200

    # A "started" event delayed in the platform's queue arrives after "destroyed".
    late = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "started"})

    # DESTROYED is final, so a late event is rejected (409) or ignored and never overwrites it.
    assert late.status_code in (200, 409)
    assert (await get_sandbox(manager, "sb-1")).state == SandboxState.DESTROYED
