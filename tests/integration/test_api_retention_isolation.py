"""Retention and verification through the API, registry choice and repository isolation."""

from __future__ import annotations

import datetime
import uuid

import httpx
import pytest

from sandbox_backup.domain import reference
from sandbox_backup.domain.states import BackupState, BackupTrigger, SandboxState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, fleet, sandboxes
from sandbox_backup.store.models import Backup
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


async def _completed(manager: BackupManager, sandbox_id: str, *, hours_ago: float, image_ref: str | None = None, registry_id: str = "main") -> Backup:
    """Insert a COMPLETED backup row as if a runner had pushed it `hours_ago`."""
    now = manager.ctx.now()
    moment = now - datetime.timedelta(hours=hours_ago)
    backup = Backup(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox_id,
        registry_id=registry_id,
        image_ref=image_ref or reference.build_backup_reference("http://127.0.0.1:9", "backups", sandbox_id, moment),
        trigger=BackupTrigger.SCHEDULE,
        state=BackupState.COMPLETED,
        attempt=1,
        next_attempt_at=moment,
        manifest_digest="sha256:" + uuid.uuid4().hex * 2,
        created_at=moment,
        started_at=moment,
        completed_at=moment,
        verified_at=moment,
        updated_at=moment,
        version=1,
    )
    async with manager.ctx.db.transaction() as session:
        session.add(backup)
    return backup


@pytest.fixture
async def five_backups(manager: BackupManager) -> list[Backup]:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    return [await _completed(manager, "sb-1", hours_ago=hours) for hours in (1, 2, 3, 4, 5)]


async def test_retention_policy_is_validated_and_merged(five_backups, api: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    rejected = await api.put("/api/v1/sandboxes/sb-1/retention", json={"keepLast": -1})
    assert rejected.status_code == 422
    assert "keepLast" in rejected.json()["error"]["message"]
    unknown = await api.put("/api/v1/sandboxes/sb-1/retention", json={"keepForever": 1})
    assert unknown.status_code == 422

    stored = await api.put("/api/v1/sandboxes/sb-1/retention", json={"keepLast": 3})
    assert stored.status_code == 200
    assert stored.json()["keepLast"] == 3
    assert stored.json()["keepDaily"] == 7  # the global default fills what the sandbox leaves out


async def test_prune_dry_run_changes_nothing(five_backups, api: httpx.AsyncClient, manager: BackupManager) -> None:  # type: ignore[no-untyped-def]
    policy = {"keepLast": 3, "keepHourly": 0, "keepDaily": 0, "keepWeekly": 0, "keepMonthly": 0, "minVerified": 0}
    assert (await api.put("/api/v1/sandboxes/sb-1/retention", json=policy)).status_code == 200

    dry = await api.post("/api/v1/sandboxes/sb-1/prune", params={"dryRun": "true"})
    assert dry.status_code == 200
    (entry,) = dry.json()["sandboxes"]
    assert entry["deleted"] == [five_backups[3].id, five_backups[4].id]
    assert entry["kept"][five_backups[0].id] == ["latest-1"]
    async with manager.ctx.db.transaction() as session:
        assert all(b.deleted_at is None for b in await backups.list_for_sandbox(session, "sb-1"))

    real = await api.post("/api/v1/sandboxes/sb-1/prune")
    assert real.json()["pruned"] == 2
    body = (await api.get("/api/v1/sandboxes/sb-1")).json()
    assert body["owedDeletions"] == 2


async def test_verify_unknown_backup_is_404(manager: BackupManager, api: httpx.AsyncClient) -> None:
    response = await api.post("/api/v1/backups/no-such-backup/verify")
    assert response.status_code == 404


async def test_registry_choice_prefers_own_organization_and_pins(manager: BackupManager) -> None:
    ctx = manager.ctx
    async with ctx.db.transaction() as session:
        await fleet.upsert_registry(session, registry_id="shared-eu", url="http://127.0.0.1:9", now=ctx.now(), region="eu", is_default=True)
        await fleet.upsert_registry(session, registry_id="acme-eu", url="http://127.0.0.1:8", now=ctx.now(), region="eu", organization_id="acme")
        await fleet.upsert_registry(session, registry_id="other-eu", url="http://127.0.0.1:7", now=ctx.now(), region="eu", organization_id="other")
        assert (await fleet.choose_backup_registry(session, organization_id="acme", region="eu")).id == "acme-eu"
        assert (await fleet.choose_backup_registry(session, organization_id="globex", region="eu")).id == "shared-eu"
        assert await fleet.choose_backup_registry(session, organization_id="globex", region="us") is None

    await add_runner(manager, "r1")
    async with ctx.db.transaction() as session:
        await sandboxes.insert_sandbox(session, "sb-acme", sandboxes.SandboxFields(state=SandboxState.STARTED, runner_id="r1", organization_id="acme", region="eu"), now=ctx.now())
    assert await manager.check_running_due() == 1
    async with ctx.db.transaction() as session:
        (first,) = await backups.list_for_sandbox(session, "sb-acme")
        assert first.registry_id == "acme-eu"
        assert first.image_ref.startswith("127.0.0.1:8/")
        # A new registry for the organization does not move a sandbox that already has history.
        await fleet.upsert_registry(session, registry_id="acme-eu-2", url="http://127.0.0.1:6", now=ctx.now(), region="eu", organization_id="acme")
        assert (await sandboxes.get_sandbox(session, "sb-acme")).backup_registry_id == "acme-eu"


async def test_restore_refuses_reference_outside_own_repository(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_runner(manager, "r2")
    await add_registry(manager, project="backups")
    await add_sandbox(manager, "victim", runner_id="r1")
    await add_sandbox(manager, "intruder", runner_id="r1")
    async with manager.ctx.db.transaction() as session:
        intruder = await sandboxes.get_sandbox(session, "intruder")
        intruder.backup_registry_id = "main"
    foreign_ref = reference.build_backup_reference("http://127.0.0.1:9", "backups", "victim", manager.ctx.now())
    smuggled = await _completed(manager, "intruder", hours_ago=1, image_ref=foreign_ref)

    started = await api.post("/api/v1/sandboxes/intruder/restore", json={"runnerId": "r2"})
    assert started.status_code == 202
    assert await manager.run_restores() == 1

    async with manager.ctx.db.transaction() as session:
        (row,) = await backups.list_for_sandbox(session, "intruder")
        sandbox = await sandboxes.get_sandbox(session, "intruder")
    assert row.id == smuggled.id
    assert "outside the repository of sandbox intruder" in row.broken_reason
    assert sandbox.state == SandboxState.ERROR
    assert "no verified backup exists" in sandbox.error_reason
