"""Runner agent restarts: the local backup state survives, and an interrupted attempt fails recoverably."""

from __future__ import annotations

from typing import Any

import docker.errors
import httpx
import pytest

from sandbox_backup.runner.state import RESTART_ERROR
from tests.fixtures.podman import PodmanEngine, RunnerAgent, TcpGate, backup_snapshot, wait_for_backup
from tests.fixtures.registry_servers import RegistryServer


def post_backup(
    agent: RunnerAgent, sandbox_id: str, registry_url: str, registry: RegistryServer, snapshot: str
) -> None:
    response = httpx.post(
        f"{agent.url}/sandboxes/{sandbox_id}/backup",
        json={
            "registry": {"url": registry_url, "username": registry.username, "password": registry.password},
            "snapshot": snapshot,
        },
        headers=agent.headers,
        timeout=30,
    )
    assert response.status_code == 201, response.text


def get_info(agent: RunnerAgent, sandbox_id: str) -> dict[str, Any]:
    response = httpx.get(f"{agent.url}/sandboxes/{sandbox_id}", headers=agent.headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_restart_mid_backup_fails_recoverably(
    runner_agent: RunnerAgent,
    sandbox_container: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    registry_gate: TcpGate,
) -> None:
    container = sandbox_container()
    snapshot = backup_snapshot(registry_gate.url, container.name)

    registry_gate.hold()
    try:
        connections_before = registry_gate.connection_count
        post_backup(runner_agent, container.name, registry_gate.url, registry_server, snapshot)
        registry_gate.wait_for_connections(connections_before + 1)
        assert get_info(runner_agent, container.name)["backupState"] == "IN_PROGRESS"

        runner_agent.restart()
    finally:
        registry_gate.release()

    info = get_info(runner_agent, container.name)
    assert info["backupState"] == "FAILED"
    assert info["backupError"] == RESTART_ERROR
    assert info["recoverable"] is True
    assert info["backupSnapshot"] == snapshot
    # Shutdown aborted the push and removed the committed image.
    with pytest.raises(docker.errors.ImageNotFound):
        podman_engine.client.images.get(snapshot)


def test_backup_state_survives_restart(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, container.name)
    post_backup(runner_agent, container.name, registry_server.url, registry_server, snapshot)
    completed = wait_for_backup(runner_agent, container.name)
    assert completed["backupState"] == "COMPLETED"

    runner_agent.restart()

    assert get_info(runner_agent, container.name) == completed


def test_backup_state_outlives_container(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, container.name)
    post_backup(runner_agent, container.name, registry_server.url, registry_server, snapshot)
    completed = wait_for_backup(runner_agent, container.name)

    container.remove(force=True)

    info = get_info(runner_agent, container.name)
    assert info["state"] == "destroyed"
    assert info["backupState"] == "COMPLETED"
    assert info["backupDigest"] == completed["backupDigest"]
    assert "daemonVersion" not in info
