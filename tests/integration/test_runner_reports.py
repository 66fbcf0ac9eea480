"""Reports from the runner agent to a manager endpoint (ReportReceiver is a stand-in for the manager)."""

from __future__ import annotations

from typing import Any

import httpx

from sandbox_backup.runner.state import RESTART_ERROR, BackupStateStore
from tests.fixtures.podman import ReportReceiver, backup_snapshot, wait_for_backup
from tests.fixtures.registry_servers import RegistryServer


def start_backup(
    agent: Any, sandbox_id: str, registry: RegistryServer, snapshot: str, *, password: str | None = None
) -> None:
    response = httpx.post(
        f"{agent.url}/sandboxes/{sandbox_id}/backup",
        json={
            "registry": {
                "url": registry.url,
                "username": registry.username,
                "password": password if password is not None else registry.password,
            },
            "snapshot": snapshot,
        },
        headers=agent.headers,
        timeout=30,
    )
    assert response.status_code == 201, response.text


def test_completed_backup_is_reported(
    runner_agent_factory: Any, report_receiver: ReportReceiver, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    agent = runner_agent_factory(manager_url=report_receiver.url)
    container = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, container.name)

    start_backup(agent, container.name, registry_server, snapshot)
    info = wait_for_backup(agent, container.name)
    [report] = report_receiver.wait_for_accepted(1)

    assert report["runner_id"] == agent.settings.runner_id
    assert report["authorization"] == f"Bearer {agent.token}"
    assert report["body"] == {
        "sandboxId": container.name,
        "snapshot": snapshot,
        "state": "COMPLETED",
        "digest": info["backupDigest"],
        "sizeBytes": info["backupSizeBytes"],
        "layerCount": info["backupLayerCount"],
        "recoverable": False,
    }


def test_failed_backup_report_has_error_without_password(
    runner_agent_factory: Any, report_receiver: ReportReceiver, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    agent = runner_agent_factory(manager_url=report_receiver.url)
    container = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, container.name)
    wrong_password = "not-the-password-4711"

    start_backup(agent, container.name, registry_server, snapshot, password=wrong_password)
    [report] = report_receiver.wait_for_accepted(1)

    assert report["body"]["state"] == "FAILED"
    assert report["body"]["recoverable"] is False
    assert "unauthorized" in report["body"]["error"]
    assert wrong_password not in str(report)


def test_failing_receiver_is_retried(
    runner_agent_factory: Any, report_receiver: ReportReceiver, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    report_receiver.fail_next = 2
    agent = runner_agent_factory(manager_url=report_receiver.url, report_retries=3, report_backoff_s=0.05)
    container = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, container.name)

    start_backup(agent, container.name, registry_server, snapshot)
    info = wait_for_backup(agent, container.name)
    report_receiver.wait_for_accepted(1)

    assert info["backupState"] == "COMPLETED"
    assert [request["status"] for request in report_receiver.requests] == [503, 503, 200]
    bodies = [request["body"] for request in report_receiver.requests]
    assert all(body == bodies[0] for body in bodies)


def test_interrupted_backup_is_reported_on_start(
    runner_agent_factory: Any, report_receiver: ReportReceiver, tmp_path: Any
) -> None:
    # An IN_PROGRESS row left behind, as by an agent that was killed during a backup.
    state_path = tmp_path / "left-behind.sqlite3"
    store = BackupStateStore(state_path)
    store.begin_attempt("sb-interrupted", "127.0.0.1:1/runner-test/backup-sb-interrupted:t1", "attempt-1")
    store.close()

    runner_agent_factory(manager_url=report_receiver.url, state_path=state_path)
    [report] = report_receiver.wait_for_accepted(1)

    assert report["body"] == {
        "sandboxId": "sb-interrupted",
        "snapshot": "127.0.0.1:1/runner-test/backup-sb-interrupted:t1",
        "state": "FAILED",
        "error": RESTART_ERROR,
        "recoverable": True,
    }
