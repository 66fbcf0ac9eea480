"""Archive, restore with verified fallback, drills, draining and destroy, on real parts.

Two runner agents on two private Podman services play two nodes; backups go to the real
registry; the manager's API is served on loopback so the agents' reports arrive over HTTP.
Periodic job bodies are called by the test, with a manual clock.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import time
from typing import Any

import docker
import httpx
import pytest

from sandbox_backup.domain import reference
from sandbox_backup.domain.states import BackupState, SandboxState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.registry import RegistryClient
from sandbox_backup.store import backups, restores, sandboxes
from sandbox_backup.store.models import Backup
from tests.fixtures.live import register_registry, register_runner, register_sandbox
from tests.fixtures.podman import read_container_file, write_container_file

pytestmark = pytest.mark.slow


class Fleet:
    """Two nodes, one sandbox on node-1, the manager and its API."""

    def __init__(self, manager: BackupManager, api: httpx.AsyncClient, clock: Any, node1: Any, node2: Any, engine1: Any, engine2: Any, container: Any, registry: Any) -> None:
        self.manager = manager
        self.api = api
        self.clock = clock
        self.node1, self.node2 = node1, node2
        self.engine1, self.engine2 = engine1, engine2
        self.container = container
        self.sandbox_id = container.name
        self.registry = registry

    async def history(self) -> list[Backup]:
        async with self.manager.ctx.db.transaction() as session:
            return await backups.list_for_sandbox(session, self.sandbox_id)

    async def sandbox(self):  # type: ignore[no-untyped-def]
        async with self.manager.ctx.db.transaction() as session:
            return await sandboxes.get_sandbox(session, self.sandbox_id)

    async def backup_now(self) -> Backup:
        """Request a backup, dispatch it and wait for the agent's report to complete it."""
        self.clock.advance(60)  # a new timestamp tag and a later completion time
        response = await self.api.post(f"/api/v1/sandboxes/{self.sandbox_id}/backup")
        assert response.status_code == 202, response.text
        return await self.dispatch_and_wait()

    async def dispatch_and_wait(self, timeout_s: float = 60.0) -> Backup:
        self.clock.advance(1)  # dispatched strictly after the event that queued it
        assert await self.manager.dispatch_pending() == 1
        deadline = time.monotonic() + timeout_s
        while True:
            newest = (await self.history())[0]
            if newest.state not in (BackupState.PENDING, BackupState.IN_PROGRESS):
                assert newest.state == BackupState.COMPLETED, newest.error_reason
                return newest
            assert time.monotonic() < deadline, f"backup still {newest.state}"
            await asyncio.sleep(0.1)

    async def event(self, kind: str) -> dict[str, Any]:
        response = await self.api.post(f"/api/v1/sandboxes/{self.sandbox_id}/events", json={"type": kind})
        assert response.status_code == 200, response.text
        return response.json()

    async def restore(self, **body: str) -> dict[str, Any]:
        response = await self.api.post(f"/api/v1/sandboxes/{self.sandbox_id}/restore", json=body)
        assert response.status_code == 202, response.text
        return response.json()

    async def restore_row(self, restore_id: str):  # type: ignore[no-untyped-def]
        async with self.manager.ctx.db.transaction() as session:
            return await restores.get(session, restore_id)

    def write(self, text: str) -> None:
        write_container_file(self.container, "/data/note.txt", text.encode())

    def read_on(self, engine: Any) -> str:
        return read_container_file(engine.client.containers.get(self.sandbox_id), "/data/note.txt").decode()

    def exists_on(self, engine: Any) -> bool:
        try:
            engine.client.containers.get(self.sandbox_id)
        except docker.errors.NotFound:
            return False
        return True


@pytest.fixture
async def fleet(manager, manager_url, manager_api, clock, runner_agent_factory, sandbox_container, podman_engine, second_podman_engine, registry_server):  # type: ignore[no-untyped-def]
    node1 = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url, runner_id="node-1")
    node2 = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url, runner_id="node-2", docker_host=second_podman_engine.docker_host)
    container = sandbox_container()
    await register_runner(manager_api, node1)
    await register_runner(manager_api, node2)
    await register_registry(manager_api, registry_server.url, registry_server)
    await register_sandbox(manager_api, container.name, "node-1")
    yield Fleet(manager, manager_api, clock, node1, node2, podman_engine, second_podman_engine, container, registry_server)
    for engine in (podman_engine, second_podman_engine):
        try:
            engine.client.api.remove_container(container.name, force=True)
        except docker.errors.NotFound:
            pass


def _registry_client(registry: Any) -> RegistryClient:
    return RegistryClient(registry.url, username=registry.username, password=registry.password)


async def test_archive_then_start_restores_on_another_node(fleet: Fleet) -> None:
    fleet.write("before archive")
    await fleet.backup_now()
    fleet.write("written after the last scheduled backup")

    body = await fleet.event("archive_requested")
    assert body["state"] == "ARCHIVING"
    assert body["backupState"] == "PENDING"  # a fresh backup, requested after the archive began
    fresh = await fleet.dispatch_and_wait()
    assert fleet.exists_on(fleet.engine1)  # still on its runner until verified

    assert await fleet.manager.finish_archives() == 1
    sandbox = await fleet.sandbox()
    assert sandbox.state == SandboxState.ARCHIVED
    assert sandbox.runner_id is None
    assert not fleet.exists_on(fleet.engine1)

    await fleet.event("started")
    assert (await fleet.sandbox()).state == SandboxState.RESTORING
    assert await fleet.manager.run_restores() == 1

    sandbox = await fleet.sandbox()
    assert sandbox.state == SandboxState.STARTED
    engine = {"node-1": fleet.engine1, "node-2": fleet.engine2}[sandbox.runner_id]
    assert fleet.read_on(engine) == "written after the last scheduled backup"
    (restore,) = (await fleet.api.get(f"/api/v1/sandboxes/{fleet.sandbox_id}/restores")).json()
    assert restore["backupId"] == fresh.id
    assert restore["state"] == "COMPLETED"


async def test_restore_skips_deleted_newest_backup(fleet: Fleet) -> None:
    fleet.write("old")
    older = await fleet.backup_now()
    fleet.write("new")
    newest = await fleet.backup_now()
    parsed = reference.parse_reference(newest.image_ref)
    async with _registry_client(fleet.registry) as client:
        assert await client.delete_manifest(parsed.repository, newest.manifest_digest)

    started = await fleet.restore(runnerId="node-2")
    assert await fleet.manager.run_restores() == 1

    restore = await fleet.restore_row(started["id"])
    assert restore.state == "COMPLETED"
    assert restore.backup_id == older.id
    assert fleet.read_on(fleet.engine2) == "old"
    assert not fleet.exists_on(fleet.engine1)  # the copy on the previous runner was removed
    broken = next(b for b in await fleet.history() if b.id == newest.id)
    assert broken.broken_at is not None
    assert "not found" in broken.broken_reason


async def test_registry_outage_never_falls_back_to_older_backup(fleet: Fleet) -> None:
    fleet.manager.ctx.settings = fleet.manager.ctx.settings.model_copy(update={"restore_max_attempts": 2})
    await fleet.backup_now()
    await fleet.backup_now()

    fleet.registry.stop()
    try:
        started = await fleet.restore(runnerId="node-2")
        assert await fleet.manager.run_restores() == 0
        restore = await fleet.restore_row(started["id"])
        assert restore.state == "RUNNING"
        assert restore.registry_attempts == 1
        assert "could not tell" in restore.error_reason
        assert restore.backup_id is None

        fleet.clock.set(restore.next_attempt_at)
        assert await fleet.manager.run_restores() == 1
    finally:
        fleet.registry.start()

    restore = await fleet.restore_row(started["id"])
    assert restore.state == "FAILED"
    assert "did not fall back to an older backup" in restore.error_reason
    assert restore.backup_id is None
    assert all(b.broken_at is None for b in await fleet.history())
    sandbox = await fleet.sandbox()
    assert sandbox.state == SandboxState.ERROR
    assert "could not tell" in sandbox.error_reason
    assert not fleet.exists_on(fleet.engine2)


async def test_restore_skips_backup_with_missing_layer(fleet: Fleet) -> None:
    fleet.write("old")
    older = await fleet.backup_now()
    fleet.write("new, in a layer that goes missing")
    newest = await fleet.backup_now()
    parsed = reference.parse_reference(newest.image_ref)
    async with _registry_client(fleet.registry) as client:
        manifest = await client.get_manifest(parsed.repository, newest.manifest_digest)
    top_layer = manifest.layer_digests[-1].split(":", 1)[1]
    blob_dir = pathlib.Path(fleet.registry.root_dir) / "docker/registry/v2/blobs/sha256" / top_layer[:2] / top_layer
    shutil.rmtree(blob_dir)

    started = await fleet.restore(runnerId="node-2")
    assert await fleet.manager.run_restores() == 1

    restore = await fleet.restore_row(started["id"])
    assert restore.state == "COMPLETED", restore.error_reason
    assert restore.backup_id == older.id
    assert fleet.read_on(fleet.engine2) == "old"
    broken = next(b for b in await fleet.history() if b.id == newest.id)
    assert "could not pull" in broken.broken_reason


async def test_restore_without_backup_puts_sandbox_in_error(fleet: Fleet) -> None:
    started = await fleet.restore(runnerId="node-2")
    assert await fleet.manager.run_restores() == 1

    restore = await fleet.restore_row(started["id"])
    assert restore.state == "FAILED"
    sandbox = await fleet.sandbox()
    assert sandbox.state == SandboxState.ERROR
    assert "no verified backup exists" in sandbox.error_reason


async def test_restore_bad_input_changes_nothing(fleet: Fleet, manager_api: httpx.AsyncClient) -> None:
    mine = await fleet.backup_now()
    await register_sandbox(manager_api, "other-sandbox", "node-1")
    await manager_api.put("/api/v1/runners/node-3", json={"apiUrl": "http://127.0.0.1:9", "token": "node-3-token", "state": "DRAINING"})
    path = f"/api/v1/sandboxes/{fleet.sandbox_id}/restore"

    unknown = await manager_api.post(path, json={"backupId": "no-such-backup"})
    assert unknown.status_code == 404
    foreign = await manager_api.post("/api/v1/sandboxes/other-sandbox/restore", json={"backupId": mine.id})
    assert foreign.status_code == 400
    assert "belongs to sandbox" in foreign.json()["error"]["message"]
    draining = await manager_api.post(path, json={"runnerId": "node-3"})
    assert draining.status_code == 409
    assert "DRAINING" in draining.json()["error"]["message"]
    missing_runner = await manager_api.post(path, json={"runnerId": "node-404"})
    assert missing_runner.status_code == 404
    extra_field = await manager_api.post(path, json={"backup": mine.id})
    assert extra_field.status_code == 422

    assert (await fleet.sandbox()).state == SandboxState.STARTED
    assert (await manager_api.get(f"/api/v1/sandboxes/{fleet.sandbox_id}/restores")).json() == []
    assert (await manager_api.get("/api/v1/sandboxes/other-sandbox/restores")).json() == []


async def test_drill_restores_a_copy_and_removes_it(fleet: Fleet, manager_api: httpx.AsyncClient) -> None:
    backup = await fleet.backup_now()
    response = await manager_api.post(f"/api/v1/sandboxes/{fleet.sandbox_id}/drill", json={"runnerId": "node-2"})
    assert response.status_code == 202, response.text
    assert response.json()["targetSandboxId"] != fleet.sandbox_id

    assert await fleet.manager.run_restores() == 1

    drill = await fleet.restore_row(response.json()["id"])
    assert drill.state == "COMPLETED", drill.error_reason
    assert [c.name for c in fleet.engine2.client.containers.list(all=True) if c.name == drill.target_sandbox_id] == []
    assert (await fleet.sandbox()).state == SandboxState.STARTED  # the sandbox itself is untouched
    verified = next(b for b in await fleet.history() if b.id == backup.id)
    assert verified.verified_at is not None


async def test_draining_runner_backs_up_and_moves_stopped_sandbox(fleet: Fleet, manager_api: httpx.AsyncClient) -> None:
    fleet.write("moved while stopped")
    await fleet.backup_now()
    fleet.clock.advance(60)
    await asyncio.to_thread(fleet.container.stop, timeout=0)
    await fleet.event("stopped")
    # The agent also reports the stop from the engine's event stream; whichever of the two
    # events lands first queues the backup, so wait for it rather than read the first reply.
    deadline = time.monotonic() + 10
    while (await fleet.sandbox()).backup_state.value != "PENDING":
        assert time.monotonic() < deadline, "the stop did not queue a backup"
        await asyncio.sleep(0.05)
    await fleet.dispatch_and_wait()

    fleet.clock.advance(60)
    response = await manager_api.post("/api/v1/runners/node-1/drain")
    assert response.status_code == 200, response.text
    assert response.json()["remaining"] == 1
    fresh = await fleet.dispatch_and_wait()
    assert fresh.trigger.value == "DRAIN"

    assert await fleet.manager.work_drains() == 1  # the move is requested
    assert await fleet.manager.run_restores() == 1

    sandbox = await fleet.sandbox()
    assert sandbox.runner_id == "node-2"
    assert sandbox.state == SandboxState.STOPPED
    assert not fleet.exists_on(fleet.engine1)
    moved = fleet.engine2.client.containers.get(fleet.sandbox_id)
    assert moved.status in ("created", "exited", "configured")
    progress = (await manager_api.get("/api/v1/runners/node-1/drain")).json()
    assert progress["sandboxes"] == 0
    assert progress["remaining"] == 0


async def test_destroy_during_push_leaves_nothing_behind(fleet: Fleet, manager_api: httpx.AsyncClient, registry_gate: Any) -> None:
    await fleet.dispatch_and_wait()  # the backup queued when the sandbox was registered
    await register_registry(manager_api, registry_gate.url, fleet.registry)
    fleet.clock.advance(60)
    response = await fleet.api.post(f"/api/v1/sandboxes/{fleet.sandbox_id}/backup")
    image_ref = response.json()["imageRef"]
    registry_gate.hold()
    try:
        before = registry_gate.connection_count
        assert await fleet.manager.dispatch_pending() == 1
        await asyncio.to_thread(registry_gate.wait_for_connections, before + 1)
        body = await fleet.event("destroyed")
        assert body["owedDeletions"] == 1
        assert await fleet.manager.work_cleanup() == 0  # waits: the push may still create the repository
    finally:
        registry_gate.release()

    deadline = time.monotonic() + 60
    while (await fleet.history())[0].state == BackupState.IN_PROGRESS:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    fleet.clock.advance(60)
    assert await fleet.manager.work_cleanup() == 1

    parsed = reference.parse_reference(image_ref)
    async with _registry_client(fleet.registry) as client:
        assert await client.list_tags(parsed.repository) == []
        assert await client.head_manifest(parsed.repository, parsed.tag) is None
    body = (await manager_api.get(f"/api/v1/sandboxes/{fleet.sandbox_id}")).json()
    assert body["owedDeletions"] == 0
