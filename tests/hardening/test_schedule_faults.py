"""Scheduling and cleanup under bad registries, empty organizations and a registry that stays unreachable."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from sandbox_backup.domain.states import SandboxBackupState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store.models import CleanupTask
from sandbox_backup.store import fleet
from tests.hardening.helpers import DIGEST, claim_all, cleanup_tasks, get_sandbox, history, post_report
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


async def test_bad_registry_starves_due_check(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    # The API rejects such a project, so the row is written to the store directly, as an existing
    # database may still contain one.
    async with manager.ctx.db.transaction() as session:
        await fleet.upsert_registry(session, registry_id="org-a", url="http://127.0.0.1:9", now=manager.ctx.now(), project="Bad Project", organization_id="org-a")
    await add_sandbox(manager, "a-sb", runner_id="r1", organization_id="org-a")
    await add_sandbox(manager, "b-sb", runner_id="r1", organization_id="org-b")

    # One sandbox whose registry is misconfigured is logged and skipped; the rest is queued.
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

    # Nothing is queued, because an empty organizationId, like None, marks a warm-pool sandbox.
    assert await manager.check_running_due() == 0


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

    # The task is postponed by at most retry_max_delay_s like every other failure, although
    # base * 2**1024 is past the range of a float.
    await manager.work_cleanup()
    task = (await cleanup_tasks(manager, "sb-1"))[0]
    assert task.attempts == 1025
    assert task.not_before > clock.now()
