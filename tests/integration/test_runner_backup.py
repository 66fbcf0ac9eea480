"""Backups through the runner agent on real Podman, pushed to a real registry."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import docker.errors
import httpx
import pytest

from sandbox_backup.domain.reference import parse_reference
from sandbox_backup.runner.manifest_digest import resolve_manifest_digest
from sandbox_backup.runner.models import RegistryCredentials
from sandbox_backup.runner.state import BackupStateStore
from tests.fixtures.podman import (
    PodmanEngine,
    ReportReceiver,
    RunnerAgent,
    TcpGate,
    backup_snapshot,
    wait_for_backup,
    write_container_file,
)
from tests.fixtures.registry_servers import RegistryServer, free_port

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def registry_body(registry: RegistryServer, *, url: str | None = None, password: str | None = None) -> dict[str, Any]:
    return {
        "url": url or registry.url,
        "project": "runner-test",
        "username": registry.username,
        "password": password if password is not None else registry.password,
    }


def post_backup(agent: RunnerAgent, sandbox_id: str, registry: dict[str, Any], snapshot: str) -> httpx.Response:
    return httpx.post(
        f"{agent.url}/sandboxes/{sandbox_id}/backup",
        json={"registry": registry, "snapshot": snapshot},
        headers=agent.headers,
        timeout=30,
    )


def image_ids(engine: PodmanEngine) -> set[str]:
    return {image.id for image in engine.client.images.list(all=True)}


def registry_tags(registry: RegistryServer, snapshot: str) -> list[str]:
    repository = parse_reference(snapshot).repository
    response = httpx.get(
        f"{registry.url}/v2/{repository}/tags/list", auth=(registry.username, registry.password), timeout=10
    )
    if response.status_code == 404:
        return []
    response.raise_for_status()
    return response.json().get("tags") or []


def current_attempt_id(agent: RunnerAgent, sandbox_id: str) -> str:
    store = BackupStateStore(agent.settings.state_path)
    try:
        record = store.get(sandbox_id)
    finally:
        store.close()
    assert record is not None
    return record.attempt_id


async def test_backup_completes_and_image_restores_file(
    runner_agent: RunnerAgent, sandbox_container: Any, podman_engine: PodmanEngine, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    marker = secrets.token_hex(16)
    write_container_file(container, "/backup-marker", marker.encode())
    images_before = image_ids(podman_engine)
    snapshot = backup_snapshot(registry_server.url, container.name)

    response = post_backup(runner_agent, container.name, registry_body(registry_server), snapshot)
    assert response.status_code == 201
    assert response.json() == "Backup started"

    info = wait_for_backup(runner_agent, container.name)
    assert info["backupState"] == "COMPLETED", info
    assert info["backupSnapshot"] == snapshot
    assert DIGEST_RE.match(info["backupDigest"])
    assert info["backupSizeBytes"] > 0
    assert info["recoverable"] is False
    assert info["state"] == "started"
    assert "backupError" not in info

    # The committed image is removed locally: the engine has the same images as before.
    assert image_ids(podman_engine) == images_before
    with pytest.raises(docker.errors.ImageNotFound):
        podman_engine.client.images.get(snapshot)

    # The digest that the push reported is the one the registry serves for the tag.
    credentials = RegistryCredentials(
        url=registry_server.url, username=registry_server.username, password=registry_server.password
    )
    assert await resolve_manifest_digest(snapshot, credentials) == info["backupDigest"]

    # The pushed image contains the file: pull it and read the file in a new container.
    parsed = parse_reference(snapshot)
    auth = {"username": registry_server.username, "password": registry_server.password}
    podman_engine.client.images.pull(f"{parsed.host}/{parsed.repository}", tag=parsed.tag, auth_config=auth)
    try:
        output = podman_engine.client.containers.run(
            snapshot, ["/bin/busybox", "cat", "/backup-marker"], remove=True, network_mode="none"
        )
        assert output.decode().strip() == marker
    finally:
        podman_engine.client.images.remove(snapshot, force=True)


def test_backup_with_wrong_password_fails_permanently(
    runner_agent: RunnerAgent, sandbox_container: Any, podman_engine: PodmanEngine, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    images_before = image_ids(podman_engine)
    snapshot = backup_snapshot(registry_server.url, container.name)
    wrong_password = "wrong-" + secrets.token_hex(8)

    registry = registry_body(registry_server, password=wrong_password)
    response = post_backup(runner_agent, container.name, registry, snapshot)
    assert response.status_code == 201

    info = wait_for_backup(runner_agent, container.name)
    assert info["backupState"] == "FAILED"
    assert info["recoverable"] is False
    assert "unauthorized" in info["backupError"] or "authentication" in info["backupError"]
    assert wrong_password not in info["backupError"]
    assert image_ids(podman_engine) == images_before
    assert registry_tags(registry_server, snapshot) == []


def test_backup_to_unreachable_registry_is_recoverable(
    runner_agent: RunnerAgent, sandbox_container: Any, podman_engine: PodmanEngine
) -> None:
    container = sandbox_container()
    images_before = image_ids(podman_engine)
    closed_url = f"http://127.0.0.1:{free_port()}"
    snapshot = backup_snapshot(closed_url, container.name)
    registry = {"url": closed_url, "username": "backup", "password": "unused"}

    assert post_backup(runner_agent, container.name, registry, snapshot).status_code == 201

    info = wait_for_backup(runner_agent, container.name)
    assert info["backupState"] == "FAILED"
    assert info["recoverable"] is True
    assert "connection refused" in info["backupError"]
    assert image_ids(podman_engine) == images_before


def test_snapshot_on_other_host_is_rejected(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer, registry_gate: TcpGate
) -> None:
    container = sandbox_container()
    # The gate reaches the same registry, so only the host check can stop this push.
    snapshot = backup_snapshot(registry_gate.url, container.name)

    response = post_backup(runner_agent, container.name, registry_body(registry_server), snapshot)

    assert response.status_code == 400
    assert registry_gate.host in response.json()["message"]
    time.sleep(0.5)
    assert registry_tags(registry_server, snapshot) == []
    info = httpx.get(f"{runner_agent.url}/sandboxes/{container.name}", headers=runner_agent.headers).json()
    assert info["backupState"] == "NONE"


@pytest.mark.parametrize(
    ("snapshot_template", "message_part"),
    [
        ("no-host-part", "has no registry host"),
        ("{host}/UPPER/case:tag", "invalid repository"),
        ("{host}/runner-test/repo:bad tag", "invalid tag"),
        ("{host}/runner-test/repo", "must be host/repository:tag"),
        ("{host}/runner-test/repo@sha256:" + "0" * 64, "must be host/repository:tag"),
    ],
)
def test_invalid_snapshot_is_rejected(
    runner_agent: RunnerAgent,
    sandbox_container: Any,
    registry_server: RegistryServer,
    snapshot_template: str,
    message_part: str,
) -> None:
    container = sandbox_container()
    snapshot = snapshot_template.format(host=registry_server.host)

    response = post_backup(runner_agent, container.name, registry_body(registry_server), snapshot)

    assert response.status_code == 400
    assert message_part in response.json()["message"]


def test_backup_of_missing_container_is_404(runner_agent: RunnerAgent, registry_server: RegistryServer) -> None:
    snapshot = backup_snapshot(registry_server.url, "sb-missing")

    response = post_backup(runner_agent, "sb-missing", registry_body(registry_server), snapshot)

    assert response.status_code == 404
    assert "sb-missing" in response.json()["message"]


def test_backup_of_unlabelled_container_is_404(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    container = sandbox_container(managed=False)
    snapshot = backup_snapshot(registry_server.url, container.name)

    response = post_backup(runner_agent, container.name, registry_body(registry_server), snapshot)

    assert response.status_code == 404


def test_repeat_of_same_snapshot_starts_nothing(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer, registry_gate: TcpGate
) -> None:
    container = sandbox_container()
    snapshot = backup_snapshot(registry_gate.url, container.name)
    registry = registry_body(registry_server, url=registry_gate.url)

    registry_gate.hold()
    try:
        connections_before = registry_gate.connection_count
        assert post_backup(runner_agent, container.name, registry, snapshot).status_code == 201
        registry_gate.wait_for_connections(connections_before + 1)
        first_attempt = current_attempt_id(runner_agent, container.name)

        # A repeat while the first push is in progress.
        assert post_backup(runner_agent, container.name, registry, snapshot).status_code == 201
        assert current_attempt_id(runner_agent, container.name) == first_attempt
    finally:
        registry_gate.release()

    info = wait_for_backup(runner_agent, container.name)
    assert info["backupState"] == "COMPLETED", info
    connections_after_push = registry_gate.connection_count

    # A repeat after completion: same record, no new connection to the registry.
    assert post_backup(runner_agent, container.name, registry, snapshot).status_code == 201
    time.sleep(0.5)
    assert current_attempt_id(runner_agent, container.name) == first_attempt
    assert registry_gate.connection_count == connections_after_push
    repeated = httpx.get(f"{runner_agent.url}/sandboxes/{container.name}", headers=runner_agent.headers).json()
    assert repeated == info


def test_newer_request_replaces_running_backup(
    runner_agent_factory: Any,
    report_receiver: ReportReceiver,
    sandbox_container: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    registry_gate: TcpGate,
) -> None:
    agent = runner_agent_factory(manager_url=report_receiver.url)
    container = sandbox_container()
    images_before = image_ids(podman_engine)
    # The older backup goes through the held gate, so its push hangs until the gate opens.
    older_snapshot = backup_snapshot(registry_gate.url, container.name)
    newer_snapshot = backup_snapshot(registry_server.url, container.name)

    registry_gate.hold()
    try:
        connections_before = registry_gate.connection_count
        gated_registry = registry_body(registry_server, url=registry_gate.url)
        older = post_backup(agent, container.name, gated_registry, older_snapshot)
        assert older.status_code == 201
        registry_gate.wait_for_connections(connections_before + 1)

        newer = post_backup(agent, container.name, registry_body(registry_server), newer_snapshot)
        assert newer.status_code == 201
        info = wait_for_backup(agent, container.name)
    finally:
        registry_gate.release()

    assert info["backupState"] == "COMPLETED", info
    assert info["backupSnapshot"] == newer_snapshot

    # Once the gate opens, the older attempt could resume if it were still alive: give it
    # time, then check that it wrote nothing, reported nothing and pushed nothing.
    time.sleep(2.0)
    after = httpx.get(f"{agent.url}/sandboxes/{container.name}", headers=agent.headers).json()
    assert after == info
    reports = report_receiver.wait_for_accepted(1)
    assert [report["body"]["snapshot"] for report in reports] == [newer_snapshot]
    assert registry_tags(registry_server, older_snapshot) == [parse_reference(newer_snapshot).tag]
    assert image_ids(podman_engine) == images_before


def test_backup_past_deadline_fails_recoverably(
    runner_agent_factory: Any,
    sandbox_container: Any,
    podman_engine: PodmanEngine,
    registry_server: RegistryServer,
    registry_gate: TcpGate,
) -> None:
    agent = runner_agent_factory(backup_timeout_s=2.0)
    container = sandbox_container()
    images_before = image_ids(podman_engine)
    snapshot = backup_snapshot(registry_gate.url, container.name)

    registry_gate.hold()
    try:
        response = post_backup(agent, container.name, registry_body(registry_server, url=registry_gate.url), snapshot)
        assert response.status_code == 201
        info = wait_for_backup(agent, container.name, timeout_s=30)
    finally:
        registry_gate.release()

    assert info["backupState"] == "FAILED"
    assert info["recoverable"] is True
    assert "timed out after 2 s" in info["backupError"]
    assert image_ids(podman_engine) == images_before
