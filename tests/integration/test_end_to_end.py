"""The manager driving real runner agents on real Podman, pushing to the real registry.

The manager's API is served on a loopback port in the test's event loop, so the agents' reports
travel over HTTP exactly as in production. Periodic job bodies are called by the test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from sandbox_backup.domain.states import BackupState, SandboxBackupState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.registry import RegistryClient
from sandbox_backup.store import backups, sandboxes
from tests.fixtures.live import register_registry, register_runner, register_sandbox
from tests.fixtures.manager import API_TOKEN
from tests.fixtures.podman import read_container_file, write_container_file

pytestmark = pytest.mark.slow


async def _register(manager: BackupManager, manager_url: str, agent: Any, registry_url: str, registry: Any, sandbox_id: str) -> None:
    async with httpx.AsyncClient(base_url=manager_url, headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        await register_runner(client, agent)
        await register_registry(client, registry_url, registry)
        await register_sandbox(client, sandbox_id, agent.settings.runner_id)


async def _history(manager: BackupManager, sandbox_id: str) -> list[backups.Backup]:
    async with manager.ctx.db.transaction() as session:
        return await backups.list_for_sandbox(session, sandbox_id)


async def _wait_for(manager: BackupManager, sandbox_id: str, predicate, timeout_s: float = 60.0) -> list[backups.Backup]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        history = await _history(manager, sandbox_id)
        if predicate(history):
            return history
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; history: {[(b.attempt, b.state.value, b.error_reason) for b in history]}")
        await asyncio.sleep(0.1)


async def test_backup_completes_by_report_with_registry_digest(
    manager: BackupManager, manager_url: str, runner_agent_factory, sandbox_container, registry_server, podman_engine
) -> None:  # type: ignore[no-untyped-def]
    agent = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url)
    container = sandbox_container()
    write_container_file(container, "/data/note.txt", b"kept across nodes\n")
    await _register(manager, manager_url, agent, registry_server.url, registry_server, container.name)

    # Registering a running sandbox that was never backed up queues its backup at once.
    assert (await _history(manager, container.name))[0].state == BackupState.PENDING
    assert await manager.check_running_due() == 0
    assert await manager.dispatch_pending() == 1
    # No progress poll runs: only the agent's report can complete the attempt.
    history = await _wait_for(manager, container.name, lambda h: h[0].state != BackupState.IN_PROGRESS)

    attempt = history[0]
    assert attempt.state == BackupState.COMPLETED, attempt.error_reason
    assert attempt.accepted_at is not None
    parsed_repository, tag = attempt.image_ref.split("/", 1)[1].rsplit(":", 1)
    async with RegistryClient(registry_server.url, username=registry_server.username, password=registry_server.password) as registry:
        manifest = await registry.head_manifest(parsed_repository, tag)
    assert manifest is not None
    assert attempt.manifest_digest == manifest.digest
    async with manager.ctx.db.transaction() as session:
        sandbox = await sandboxes.get_sandbox(session, container.name)
    assert sandbox.backup_state == SandboxBackupState.COMPLETED
    assert sandbox.last_backup_at is not None

    auth = {"username": registry_server.username, "password": registry_server.password}
    image = await asyncio.to_thread(podman_engine.client.images.pull, attempt.image_ref, auth_config=auth)
    restored = await asyncio.to_thread(podman_engine.client.containers.create, image.id, ["/bin/busybox", "true"], network_mode="none")
    try:
        assert read_container_file(restored, "/data/note.txt") == b"kept across nodes\n"
    finally:
        restored.remove(force=True)
        podman_engine.client.images.remove(image.id, force=True)


async def test_runner_restart_mid_backup_is_reconciled(
    manager: BackupManager, manager_url: str, runner_agent_factory, sandbox_container, registry_server, registry_gate, clock
) -> None:  # type: ignore[no-untyped-def]
    agent = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url)
    container = sandbox_container()
    await _register(manager, manager_url, agent, registry_gate.url, registry_server, container.name)
    await manager.check_running_due()

    registry_gate.hold()
    try:
        before = registry_gate.connection_count
        assert await manager.dispatch_pending() == 1
        await asyncio.to_thread(registry_gate.wait_for_connections, before + 1)
        await asyncio.to_thread(agent.restart)
    finally:
        registry_gate.release()

    # The restarted agent reports the interrupted attempt as failed and recoverable.
    history = await _wait_for(manager, container.name, lambda h: len(h) == 2)
    retry, interrupted = history
    assert interrupted.state == BackupState.ERROR
    assert "restarted" in interrupted.error_reason
    assert interrupted.error_transient is True
    assert retry.state == BackupState.PENDING
    assert retry.attempt == 2

    clock.set(retry.next_attempt_at)
    assert await manager.dispatch_pending() == 1
    history = await _wait_for(manager, container.name, lambda h: h[0].state != BackupState.IN_PROGRESS)
    assert [b.state for b in history] == [BackupState.COMPLETED, BackupState.ERROR]


async def test_runner_that_lost_its_state_is_reconciled(
    manager: BackupManager, manager_url: str, runner_agent_factory, sandbox_container, registry_server, registry_gate
) -> None:  # type: ignore[no-untyped-def]
    agent = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url)
    container = sandbox_container()
    await _register(manager, manager_url, agent, registry_gate.url, registry_server, container.name)
    await manager.check_running_due()

    registry_gate.hold()
    try:
        before = registry_gate.connection_count
        assert await manager.dispatch_pending() == 1
        await asyncio.to_thread(registry_gate.wait_for_connections, before + 1)
        await asyncio.to_thread(agent.stop)
        agent.settings.state_path.unlink()  # a node that comes back with an empty disk
        await asyncio.to_thread(agent.start)
    finally:
        registry_gate.release()

    assert (await _history(manager, container.name))[0].state == BackupState.IN_PROGRESS
    assert await manager.sync_progress() == 1

    retry, lost = await _history(manager, container.name)
    assert lost.state == BackupState.ERROR
    assert "no longer knows this attempt" in lost.error_reason
    assert retry.state == BackupState.PENDING
