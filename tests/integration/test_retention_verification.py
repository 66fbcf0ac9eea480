"""Verification and retention pruning against a real registry, on SQLite and PostgreSQL.

Images are pushed to the session's `registry_server` under a project that only one test uses,
and matching COMPLETED backup rows are inserted directly, so no runner is involved.
"""

from __future__ import annotations

import datetime
import json
import uuid

import pytest
import sqlalchemy as sa

from sandbox_backup import errors
from sandbox_backup.domain import reference
from sandbox_backup.domain.states import BackupState, BackupTrigger, RestorePurpose, RestoreState
from sandbox_backup.manager import retention, verification
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.manager.verification import VerifyOutcome
from sandbox_backup.registry import RegistryClient, mediatypes
from sandbox_backup.store import retention_queries
from sandbox_backup.store.models import Backup, CleanupTask, Restore, Sandbox
from tests.fixtures.manager import ManagerFactory, add_registry, add_runner, add_sandbox
from tests.fixtures.registry_images import http_client, push_test_image, sha256_digest
from tests.fixtures.registry_servers import RegistryServer

HOUR = datetime.timedelta(hours=1)
# Nothing listens here, so calls to this registry fail with a connection error.
UNREACHABLE_URL = "http://127.0.0.1:9"


@pytest.fixture
async def seeded(manager: BackupManager, registry_server: RegistryServer) -> BackupManager:
    """A manager with runner r1, registry `main` on the real registry, and sandbox sb-1."""
    project = f"rv{uuid.uuid4().hex[:10]}"
    await add_runner(manager, "r1")
    await add_registry(manager, "main", url=registry_server.url, username=registry_server.username, password=registry_server.password, project=project)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    return manager


def repository_of(manager_project: str, sandbox_id: str = "sb-1") -> str:
    return reference.backup_repository(manager_project, sandbox_id)


async def project_of(manager: BackupManager, registry_id: str = "main") -> str:
    async with manager.ctx.db.transaction() as session:
        project = (await session.execute(sa.text("SELECT project FROM registries WHERE id = :id"), {"id": registry_id})).scalar_one()
    return project


async def insert_backup(
    manager: BackupManager,
    *,
    tag: str,
    digest: str | None,
    completed_at: datetime.datetime,
    sandbox_id: str = "sb-1",
    registry_id: str = "main",
    host: str = "127.0.0.1:5000",
    verified_at: datetime.datetime | None = None,
    broken_at: datetime.datetime | None = None,
) -> str:
    """Insert a COMPLETED backup row for `{host}/{project}/backup-{sandbox}:{tag}`; return its id."""
    project = await project_of(manager, registry_id)
    backup = Backup(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox_id,
        runner_id="r1",
        registry_id=registry_id,
        image_ref=f"{host}/{repository_of(project, sandbox_id)}:{tag}",
        trigger=BackupTrigger.SCHEDULE,
        state=BackupState.COMPLETED,
        attempt=1,
        next_attempt_at=completed_at,
        manifest_digest=digest,
        size_bytes=1,
        created_at=completed_at,
        started_at=completed_at,
        completed_at=completed_at,
        verified_at=verified_at,
        broken_at=broken_at,
        broken_reason="broken for the test" if broken_at else None,
        updated_at=completed_at,
        version=1,
    )
    async with manager.ctx.db.transaction() as session:
        session.add(backup)
    return backup.id


async def load(manager: BackupManager, backup_id: str) -> Backup:
    async with manager.ctx.db.transaction() as session:
        backup = await session.get(Backup, backup_id)
    assert backup is not None
    return backup


async def cleanup_rows(manager: BackupManager) -> list[CleanupTask]:
    async with manager.ctx.db.transaction() as session:
        return list((await session.execute(sa.select(CleanupTask).order_by(CleanupTask.digest))).scalars())


def client_for(server: RegistryServer) -> RegistryClient:
    return RegistryClient(server.url, username=server.username, password=server.password)


def layer(label: str) -> bytes:
    """Layer content that no other test pushes, so deleting it affects only this test."""
    return f"{label} {uuid.uuid4().hex}".encode()


async def push_backup(
    manager: BackupManager,
    server: RegistryServer,
    tag: str,
    *,
    layers: list[bytes],
    completed_at: datetime.datetime,
    media_type: str = mediatypes.OCI_MANIFEST,
    verified_at: datetime.datetime | None = None,
    broken_at: datetime.datetime | None = None,
) -> tuple[str, str]:
    """Push an image under sb-1's repository and insert its backup row; return (backup id, digest)."""
    repository = repository_of(await project_of(manager))
    digest = push_test_image(server, repository, tag, layers=layers, media_type=media_type)
    backup_id = await insert_backup(manager, tag=tag, digest=digest, completed_at=completed_at, host=server.host, verified_at=verified_at, broken_at=broken_at)
    return backup_id, digest


# Verification


async def test_verify_records_size_and_layers(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    layers = [layer("first"), layer("second layer")]
    backup_id, _ = await push_backup(manager, registry_server, "t1", layers=layers, completed_at=manager.ctx.now() - HOUR)

    outcome = await verification.verify_backup(manager.ctx, backup_id)

    row = await load(manager, backup_id)
    assert outcome == VerifyOutcome.VERIFIED
    assert row.verified_at == manager.ctx.now()
    assert row.size_bytes == sum(len(content) for content in layers)
    assert row.layer_count == 2
    assert row.broken_at is None


@pytest.mark.parametrize("media_type", [mediatypes.OCI_INDEX, mediatypes.DOCKER_MANIFEST_LIST, mediatypes.DOCKER_MANIFEST])
async def test_verify_other_manifest_types(seeded: BackupManager, registry_server: RegistryServer, media_type: str) -> None:
    manager = seeded
    layers = [layer("only")]
    backup_id, _ = await push_backup(manager, registry_server, "t1", layers=layers, completed_at=manager.ctx.now(), media_type=media_type)

    outcome = await verification.verify_backup(manager.ctx, backup_id)

    row = await load(manager, backup_id)
    assert outcome == VerifyOutcome.VERIFIED
    assert row.layer_count == 1
    assert row.size_bytes == len(layers[0])


async def test_verify_deleted_manifest_is_broken(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    backup_id, digest = await push_backup(manager, registry_server, "t1", layers=[layer("gone")], completed_at=manager.ctx.now())
    async with client_for(registry_server) as client:
        assert await client.delete_manifest(repository_of(await project_of(manager)), digest)

    outcome = await verification.verify_backup(manager.ctx, backup_id)

    row = await load(manager, backup_id)
    assert outcome == VerifyOutcome.BROKEN
    assert row.broken_at == manager.ctx.now()
    assert "manifest deleted from the registry" in row.broken_reason
    assert row.verified_at is None


async def test_verify_moved_tag_is_broken(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    backup_id, recorded = await push_backup(manager, registry_server, "t1", layers=[layer("original")], completed_at=manager.ctx.now())
    moved_to = push_test_image(registry_server, repository_of(await project_of(manager)), "t1", layers=[layer("replacement")])

    outcome = await verification.verify_backup(manager.ctx, backup_id)

    row = await load(manager, backup_id)
    assert outcome == VerifyOutcome.BROKEN
    assert row.broken_reason == f"tag t1 now points at {moved_to} instead of the recorded {recorded}"


async def test_verify_missing_layer_blob_is_broken(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    present, lost = layer("present"), layer("lost")
    backup_id, _ = await push_backup(manager, registry_server, "t1", layers=[present, lost], completed_at=manager.ctx.now())
    repository = repository_of(await project_of(manager))
    # distribution 2.8 with deletes enabled unlinks the blob from the repository.
    with http_client(registry_server) as http:
        response = http.delete(f"/v2/{repository}/blobs/{sha256_digest(lost)}")
    assert response.status_code == 202

    outcome = await verification.verify_backup(manager.ctx, backup_id)

    row = await load(manager, backup_id)
    assert outcome == VerifyOutcome.BROKEN
    assert row.broken_reason == f"layer blob {sha256_digest(lost)} is missing from the registry"
    assert sha256_digest(present) not in row.broken_reason


async def test_verify_registry_down_changes_nothing(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    backup_id, _ = await push_backup(manager, registry_server, "t1", layers=[layer("outage")], completed_at=manager.ctx.now())
    before = await load(manager, backup_id)

    registry_server.stop()
    try:
        outcome = await verification.verify_backup(manager.ctx, backup_id)
    finally:
        registry_server.start()

    after = await load(manager, backup_id)
    assert outcome == VerifyOutcome.UNKNOWN
    assert after.version == before.version
    assert after.verified_at is None
    assert after.broken_at is None
    assert after.size_bytes == before.size_bytes


async def test_verify_without_digest_is_broken(seeded: BackupManager) -> None:
    backup_id = await insert_backup(seeded, tag="t1", digest=None, completed_at=seeded.ctx.now())

    outcome = await verification.verify_backup(seeded.ctx, backup_id)

    assert outcome == VerifyOutcome.BROKEN
    assert "no manifest digest was recorded" in (await load(seeded, backup_id)).broken_reason


async def test_verify_rejects_unknown_and_deleted(seeded: BackupManager) -> None:
    backup_id = await insert_backup(seeded, tag="t1", digest="sha256:" + "1" * 64, completed_at=seeded.ctx.now())
    async with seeded.ctx.db.transaction() as session:
        await session.execute(sa.update(Backup).where(Backup.id == backup_id).values(deleted_at=seeded.ctx.now()))

    with pytest.raises(errors.NotFound):
        await verification.verify_backup(seeded.ctx, "no-such-backup")
    with pytest.raises(errors.Conflict, match="deleted"):
        await verification.verify_backup(seeded.ctx, backup_id)


async def test_verify_due_picks_due_backups(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    now = manager.ctx.now()
    max_age = datetime.timedelta(seconds=manager.ctx.settings.verify_max_age_s)
    never, _ = await push_backup(manager, registry_server, "never", layers=[layer("never")], completed_at=now - 3 * HOUR)
    stale, _ = await push_backup(manager, registry_server, "stale", layers=[layer("stale")], completed_at=now - 2 * max_age, verified_at=now - max_age - HOUR)
    fresh, _ = await push_backup(manager, registry_server, "fresh", layers=[layer("fresh")], completed_at=now - 2 * HOUR, verified_at=now - HOUR)
    broken, _ = await push_backup(manager, registry_server, "broken", layers=[layer("broken")], completed_at=now - HOUR, broken_at=now - HOUR)

    assert await verification.verify_due(manager.ctx) == 2

    assert (await load(manager, never)).verified_at == now
    assert (await load(manager, stale)).verified_at == now
    assert (await load(manager, fresh)).verified_at == now - HOUR
    assert (await load(manager, broken)).verified_at is None
    assert await verification.verify_due(manager.ctx) == 0


async def test_verify_due_skips_unreachable_registry(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    now = manager.ctx.now()
    await add_registry(manager, "down", url=UNREACHABLE_URL, project="down")
    # Older than every backup of `main`, so they come first in the pass.
    stuck = [await insert_backup(manager, tag=f"d{index}", digest="sha256:" + f"{index}" * 64, completed_at=now - 10 * HOUR, registry_id="down", host="127.0.0.1:9") for index in range(3)]
    reachable, _ = await push_backup(manager, registry_server, "up", layers=[layer("up")], completed_at=now - HOUR)

    assert await verification.verify_due(manager.ctx) == 1

    assert (await load(manager, reachable)).verified_at == now
    for backup_id in stuck:
        row = await load(manager, backup_id)
        assert row.verified_at is None
        assert row.broken_at is None


# Retention


def small_policy(**counts: int) -> str:
    return json.dumps({"keep_last": 0, "keep_hourly": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "min_verified": 0, **counts})


async def set_policy(manager: BackupManager, sandbox_id: str, policy_json: str | None) -> None:
    async with manager.ctx.db.transaction() as session:
        await session.execute(sa.update(Sandbox).where(Sandbox.id == sandbox_id).values(retention_policy=policy_json))


async def start_restore(manager: BackupManager, backup_id: str, *, sandbox_id: str = "sb-1") -> None:
    now = manager.ctx.now()
    restore = Restore(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox_id,
        purpose=RestorePurpose.RESTORE.value,
        state=RestoreState.RUNNING.value,
        backup_id=backup_id,
        target_sandbox_id=sandbox_id,
        registry_attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
        version=1,
    )
    async with manager.ctx.db.transaction() as session:
        session.add(restore)


async def deleted_ids(manager: BackupManager) -> set[str]:
    async with manager.ctx.db.transaction() as session:
        return set((await session.execute(sa.select(Backup.id).where(Backup.deleted_at.is_not(None)))).scalars())


async def test_prune_then_cleanup_deletes_manifests(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    now = manager.ctx.now()
    repository = repository_of(await project_of(manager))
    shared_layers = [layer("shared")]
    oldest, d_oldest = await push_backup(manager, registry_server, "t1", layers=[layer("oldest")], completed_at=now - 6 * HOUR)
    restoring, d_restoring = await push_backup(manager, registry_server, "t2", layers=[layer("restoring")], completed_at=now - 5 * HOUR)
    # The same content pushed twice has one manifest digest, and the newest copy is kept.
    old_copy, d_shared = await push_backup(manager, registry_server, "t3", layers=shared_layers, completed_at=now - 4 * HOUR)
    middle, d_middle = await push_backup(manager, registry_server, "t4", layers=[layer("middle")], completed_at=now - 3 * HOUR)
    second, d_second = await push_backup(manager, registry_server, "t5", layers=[layer("second")], completed_at=now - 2 * HOUR)
    newest, d_newest = await push_backup(manager, registry_server, "t6", layers=shared_layers, completed_at=now - HOUR)
    assert d_newest == d_shared
    await set_policy(manager, "sb-1", small_policy(keep_last=2))
    await start_restore(manager, restoring)

    preview = await retention.prune(manager.ctx, sandbox_id="sb-1", dry_run=True)

    assert preview.dry_run
    [planned] = preview.sandboxes
    assert set(planned.pruned_ids) == {oldest, old_copy, middle}
    assert {digest for _, _, digest in planned.queued} == {d_oldest, d_middle}
    assert planned.plan.reasons(restoring) == ("protected",)
    assert planned.plan.reasons(newest) == ("latest-1",)
    assert await cleanup_rows(manager) == []
    assert await deleted_ids(manager) == set()

    result = await retention.prune(manager.ctx, sandbox_id="sb-1")

    assert result.pruned_count == 3
    assert await deleted_ids(manager) == {oldest, old_copy, middle}
    tasks = await cleanup_rows(manager)
    assert sorted(task.digest for task in tasks) == sorted([d_oldest, d_middle])
    assert {task.repository for task in tasks} == {repository}
    assert {task.registry_id for task in tasks} == {"main"}
    assert (await load(manager, oldest)).deleted_at == now

    again = await retention.prune(manager.ctx, sandbox_id="sb-1")
    assert again.pruned_count == 0
    assert len(await cleanup_rows(manager)) == 2

    assert await manager.work_cleanup() == 2

    async with client_for(registry_server) as client:
        for digest in (d_oldest, d_middle):
            assert await client.head_manifest(repository, digest) is None, digest
        for digest in (d_restoring, d_shared, d_second):
            assert await client.head_manifest(repository, digest) is not None, digest
        assert await client.head_manifest(repository, "t6") is not None


async def test_mark_deleted_sees_late_restore(seeded: BackupManager) -> None:
    manager = seeded
    now = manager.ctx.now()
    old = await insert_backup(manager, tag="t1", digest="sha256:" + "1" * 64, completed_at=now - 2 * HOUR)
    await insert_backup(manager, tag="t2", digest="sha256:" + "2" * 64, completed_at=now - HOUR)
    await set_policy(manager, "sb-1", small_policy(keep_last=1))
    preview = await retention.prune(manager.ctx, sandbox_id="sb-1", dry_run=True)
    assert preview.sandboxes[0].pruned_ids == (old,)

    # The restore starts after the plan was made; the guarded update must still see it.
    await start_restore(manager, old)
    async with manager.ctx.db.transaction() as session:
        marked = await retention_queries.mark_deleted(session, old, now=now)

    assert not marked
    assert await deleted_ids(manager) == set()


async def test_prune_all_uses_global_default(manager_factory: ManagerFactory) -> None:
    manager = await manager_factory(
        retention_keep_last=1,
        retention_keep_hourly=0,
        retention_keep_daily=0,
        retention_keep_weekly=0,
        retention_keep_monthly=0,
        retention_min_verified=0,
        retention_batch=1,
    )
    await add_runner(manager, "r1")
    await add_registry(manager, "main", url=UNREACHABLE_URL, project="proj")
    now = manager.ctx.now()
    for sandbox_id in ("sb-a", "sb-b", "sb-bad"):
        await add_sandbox(manager, sandbox_id, runner_id="r1")
        for index in range(3):
            await insert_backup(manager, sandbox_id=sandbox_id, tag=f"t{index}", digest=f"sha256:{sandbox_id[-1]}{index}" + "0" * 62, completed_at=now - index * HOUR)
    await set_policy(manager, "sb-b", small_policy(keep_last=2))
    await set_policy(manager, "sb-bad", '{"keep_last": -4}')

    preview = await retention.prune(manager.ctx, dry_run=True)

    by_sandbox = {entry.sandbox_id: entry for entry in preview.sandboxes}
    assert len(by_sandbox["sb-a"].pruned_ids) == 2
    assert len(by_sandbox["sb-b"].pruned_ids) == 1
    assert "keep_last = -4 is invalid" in by_sandbox["sb-bad"].error
    assert await deleted_ids(manager) == set()

    assert await retention.prune_all(manager.ctx) == 3
    assert len(await cleanup_rows(manager)) == 3
    assert await retention.prune_all(manager.ctx) == 0


async def test_prune_unknown_sandbox_raises(seeded: BackupManager) -> None:
    with pytest.raises(errors.NotFound, match="no-such-sandbox"):
        await retention.prune(seeded.ctx, sandbox_id="no-such-sandbox")


async def test_pruned_digest_cleanup_spares_pending_attempt(seeded: BackupManager, registry_server: RegistryServer) -> None:
    manager = seeded
    now = manager.ctx.now()
    await push_backup(manager, registry_server, "t1", layers=[layer("old")], completed_at=now - 2 * HOUR)
    await push_backup(manager, registry_server, "t2", layers=[layer("new")], completed_at=now - HOUR)
    await set_policy(manager, "sb-1", small_policy(keep_last=1))
    assert (await retention.prune(manager.ctx, sandbox_id="sb-1")).pruned_count == 1
    # The sandbox is still running, so its next backup is queued while the deletion is owed.
    assert await manager.check_running_due() == 1

    await manager.work_cleanup()

    async with manager.ctx.db.transaction() as session:
        attempts = list((await session.execute(sa.select(Backup).where(Backup.state != BackupState.COMPLETED))).scalars())
    assert [attempt.state for attempt in attempts] == [BackupState.PENDING], attempts[0].error_reason
