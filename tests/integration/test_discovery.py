"""Container discovery: runner agents on a private Podman report their labelled containers to the manager.

The manager's API is served on a loopback port in the test's event loop and the agents run in
their own threads, so inventories and events travel over HTTP as in production. No periodic job
of the manager runs: whatever the manager records here comes from the agent's messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import docker.errors
import httpx
import pytest

from sandbox_backup import servers
from sandbox_backup.api.app import create_app
from sandbox_backup.domain.states import BackupState, SandboxBackupState, SandboxState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, cleanup, sandboxes
from sandbox_backup.store.models import Sandbox
from tests.fixtures.manager import add_registry, add_runner, add_sandbox
from tests.fixtures.podman import MANAGED_LABEL, SLEEP_COMMAND, PodmanEngine, run_podman_sh
from tests.fixtures.registry_servers import free_port

RUNNER_TOKEN = "runner-token"
WAIT_TIMEOUT_S = 30.0


# Helpers on the manager's database.


async def _sandbox(manager: BackupManager, sandbox_id: str) -> Sandbox | None:
    async with manager.ctx.db.transaction() as session:
        return await sandboxes.get_sandbox(session, sandbox_id)


async def _history(manager: BackupManager, sandbox_id: str) -> list[backups.Backup]:
    async with manager.ctx.db.transaction() as session:
        return await backups.list_for_sandbox(session, sandbox_id)


async def _wait_for_sandbox(
    manager: BackupManager, sandbox_id: str, predicate: Callable[[Sandbox | None], bool], timeout_s: float = WAIT_TIMEOUT_S
) -> Sandbox | None:
    deadline = time.monotonic() + timeout_s
    while True:
        sandbox = await _sandbox(manager, sandbox_id)
        if predicate(sandbox):
            return sandbox
        if time.monotonic() > deadline:
            last = (sandbox.state.value, sandbox.runner_id, sandbox.organization_id) if sandbox else None
            raise AssertionError(f"sandbox {sandbox_id} did not reach the expected record within {timeout_s} s; last: {last}")
        await asyncio.sleep(0.05)


async def _wait_for_history(
    manager: BackupManager, sandbox_id: str, predicate: Callable[[list[backups.Backup]], bool], timeout_s: float = WAIT_TIMEOUT_S
) -> list[backups.Backup]:
    deadline = time.monotonic() + timeout_s
    while True:
        history = await _history(manager, sandbox_id)
        if predicate(history):
            return history
        if time.monotonic() > deadline:
            raise AssertionError(f"backups of {sandbox_id} did not reach the expected states within {timeout_s} s: {[b.state.value for b in history]}")
        await asyncio.sleep(0.05)


def _in_state(state: SandboxState) -> Callable[[Sandbox | None], bool]:
    return lambda sandbox: sandbox is not None and sandbox.state == state


# Fixtures: the manager's API on a loopback port, labelled containers, and the agent.


@pytest.fixture
async def manager_url(manager: BackupManager) -> AsyncIterator[str]:
    server = servers.make_server(create_app(manager), host="127.0.0.1", port=free_port())
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    await task


@pytest.fixture
async def runner_client(manager: BackupManager) -> AsyncIterator[httpx.AsyncClient]:
    """The manager's app called in process, with runner-1's token; runner-1 and a registry exist."""
    await add_runner(manager, "runner-1", token=RUNNER_TOKEN)
    await add_registry(manager)
    transport = httpx.ASGITransport(app=create_app(manager))
    headers = {"Authorization": f"Bearer {RUNNER_TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://manager", headers=headers) as client:
        yield client


@pytest.fixture
def containers(podman_engine: PodmanEngine) -> Iterator[Callable[..., Any]]:
    """Return `run(name=None, labels=None, managed=True)`, a factory of running busybox containers."""
    created: list[str] = []

    def run(name: str | None = None, *, labels: dict[str, str] | None = None, managed: bool = True) -> Any:
        name = name or f"disc-{uuid.uuid4().hex[:12]}"
        all_labels = {MANAGED_LABEL: "true"} if managed else {}
        all_labels.update(labels or {})
        created.append(name)
        return podman_engine.client.containers.run(
            podman_engine.mini_image, SLEEP_COMMAND, name=name, labels=all_labels, detach=True, stop_signal="SIGKILL", network_mode="none"
        )

    yield run
    for name in created:
        try:
            podman_engine.client.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture
def start_agent(manager: BackupManager, manager_url: str, runner_agent_factory: Callable[..., Any]) -> Callable[..., Any]:
    """Return `await start(**settings)`: register a runner with a fresh token, then start its agent."""

    async def start(**overrides: Any) -> Any:
        runner_id = f"runner-{uuid.uuid4().hex[:8]}"
        token = secrets.token_urlsafe(24)
        port = free_port()
        await add_runner(manager, runner_id, api_url=f"http://127.0.0.1:{port}", token=token)
        values = {"runner_id": runner_id, "token": token, "port": port, "manager_url": manager_url, "event_reconnect_backoff_s": 0.2, **overrides}
        return await asyncio.to_thread(runner_agent_factory, **values)

    return start


# The discovery endpoints, called in process.


async def test_discovery_rejects_wrong_runner_token(runner_client: httpx.AsyncClient) -> None:
    body = {"sandboxes": [{"sandboxId": "sb-1", "state": "STARTED"}]}

    wrong_token = await runner_client.put("/api/v1/runners/runner-1/sandboxes", json=body, headers={"Authorization": "Bearer wrong"})
    unknown_runner = await runner_client.put("/api/v1/runners/runner-x/sandboxes", json=body)
    no_token = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-1", "event": "started"}, headers={"Authorization": ""})
    # The token is checked before the body, so an unauthenticated caller learns nothing from validation.
    invalid_body = await runner_client.put("/api/v1/runners/runner-1/sandboxes", json={"bad": 1}, headers={"Authorization": "Bearer wrong"})

    for response in (wrong_token, unknown_runner, no_token, invalid_body):
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "RunnerTokenRejected"
        assert "wrong token" in error["message"]
        assert RUNNER_TOKEN not in response.text


async def test_inventory_records_and_skips_invalid_ids(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    body = {
        "sandboxes": [
            {"sandboxId": "sb-run", "state": "STARTED", "organizationId": "org-a", "labels": {"sandbox-backup.organization-id": "org-a"}},
            {"sandboxId": "sb-eph", "state": "STOPPED", "ephemeral": True},
            {"sandboxId": "Bad_Name", "state": "STARTED"},
            {"sandboxId": "x" * 300, "state": "STARTED"},
            {"sandboxId": "sb-long-org", "state": "STARTED", "organizationId": "o" * 200},
            {"sandboxId": "sb-nul-org", "state": "STARTED", "organizationId": "org\u0000x"},
        ]
    }

    response = await runner_client.put("/api/v1/runners/runner-1/sandboxes", json=body)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["recorded"] == ["sb-run", "sb-eph"]
    skipped = {item["sandboxId"]: item["reason"] for item in result["skipped"]}
    assert set(skipped) == {"Bad_Name", "x" * 300, "sb-long-org", "sb-nul-org"}
    assert "cannot form an image reference" in skipped["Bad_Name"]
    assert "longer than 128" in skipped["sb-long-org"]
    assert "NUL" in skipped["sb-nul-org"]

    running = await _sandbox(manager, "sb-run")
    assert (running.state, running.runner_id, running.organization_id, running.ephemeral) == (SandboxState.STARTED, "runner-1", "org-a", False)
    ephemeral = await _sandbox(manager, "sb-eph")
    assert (ephemeral.state, ephemeral.ephemeral, ephemeral.organization_id) == (SandboxState.STOPPED, True, None)
    assert await _history(manager, "sb-eph") == []
    assert await _sandbox(manager, "Bad_Name") is None


async def test_inventory_keeps_platform_fields(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    await add_sandbox(manager, "sb-platform", runner_id="runner-1", organization_id="org-platform")
    await add_sandbox(manager, "sb-warm", runner_id="runner-1", organization_id=None)
    body = {
        "sandboxes": [
            {"sandboxId": "sb-platform", "state": "STOPPED", "organizationId": "default", "ephemeral": True},
            {"sandboxId": "sb-warm", "state": "STARTED", "organizationId": "default"},
        ]
    }

    response = await runner_client.put("/api/v1/runners/runner-1/sandboxes", json=body)

    assert response.status_code == 200, response.text
    assert response.json()["recorded"] == ["sb-platform", "sb-warm"]
    platform = await _sandbox(manager, "sb-platform")
    assert platform.state == SandboxState.STOPPED
    assert platform.organization_id == "org-platform"
    assert platform.ephemeral is False
    assert platform.backup_state == SandboxBackupState.PENDING
    warm = await _sandbox(manager, "sb-warm")
    assert warm.organization_id is None


async def test_inventory_never_destroys_missing_sandbox(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    await add_sandbox(manager, "sb-missing", runner_id="runner-1")

    response = await runner_client.put("/api/v1/runners/runner-1/sandboxes", json={"sandboxes": []})

    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": [], "skipped": []}
    assert (await _sandbox(manager, "sb-missing")).state == SandboxState.STARTED


async def test_events_skip_sandbox_of_other_runner(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    await add_runner(manager, "runner-2")
    await add_sandbox(manager, "sb-elsewhere", runner_id="runner-2")

    for event in ("stopped", "destroyed"):
        response = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-elsewhere", "event": event})
        assert response.status_code == 200, response.text
        assert response.json()["recorded"] == []
        assert "runner-2" in response.json()["skipped"][0]["reason"]

    sandbox = await _sandbox(manager, "sb-elsewhere")
    assert (sandbox.state, sandbox.runner_id) == (SandboxState.STARTED, "runner-2")


async def test_destroyed_event_keeps_archived_sandbox(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    await add_sandbox(manager, "sb-archived", runner_id="runner-1", state=SandboxState.ARCHIVED)

    response = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-archived", "event": "destroyed"})

    assert response.status_code == 200, response.text
    assert "ARCHIVED" in response.json()["skipped"][0]["reason"]
    assert (await _sandbox(manager, "sb-archived")).state == SandboxState.ARCHIVED


async def test_event_for_new_sandbox_creates_it(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    body = {"sandboxId": "sb-new", "event": "stopped", "organizationId": "org-b"}

    response = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json=body)
    unknown_destroy = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-never", "event": "destroyed"})
    invalid = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "-bad-", "event": "started"})

    assert response.json() == {"recorded": ["sb-new"], "skipped": []}
    sandbox = await _sandbox(manager, "sb-new")
    assert (sandbox.state, sandbox.organization_id, sandbox.backup_state) == (SandboxState.STOPPED, "org-b", SandboxBackupState.PENDING)
    assert unknown_destroy.status_code == 200
    assert "not known" in unknown_destroy.json()["skipped"][0]["reason"]
    assert invalid.status_code == 200
    assert invalid.json()["skipped"][0]["sandboxId"] == "-bad-"


async def test_destroyed_id_not_recorded_again(runner_client: httpx.AsyncClient, manager: BackupManager) -> None:
    await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-again", "event": "stopped", "organizationId": "org"})

    destroyed = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-again", "event": "destroyed"})
    destroyed_twice = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-again", "event": "destroyed"})
    back = await runner_client.put("/api/v1/runners/runner-1/sandboxes", json={"sandboxes": [{"sandboxId": "sb-again", "state": "STARTED"}]})
    started = await runner_client.post("/api/v1/runners/runner-1/sandbox-events", json={"sandboxId": "sb-again", "event": "started"})

    assert destroyed.json()["recorded"] == ["sb-again"]
    assert destroyed_twice.json()["recorded"] == ["sb-again"]
    for response in (back, started):
        assert response.status_code == 200, response.text
        assert "never recorded again" in response.json()["skipped"][0]["reason"]
    sandbox = await _sandbox(manager, "sb-again")
    assert (sandbox.state, sandbox.desired_state) == (SandboxState.DESTROYED, SandboxState.DESTROYED)
    async with manager.ctx.db.transaction() as session:
        assert await cleanup.owed_count(session, sandbox_id="sb-again") == 1


# Real agents on the private Podman.

@pytest.mark.slow
async def test_agent_start_reports_labelled_containers(
    manager: BackupManager, start_agent: Callable[..., Any], containers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    labelled = containers()
    with_org = containers(labels={"sandbox-backup.organization-id": "org-label", "sandbox-backup.ephemeral": "true"})
    unlabelled = containers(managed=False)
    invalid = containers(f"Invalid_{uuid.uuid4().hex[:6]}")
    caplog.set_level(logging.WARNING, logger="sandbox_backup.runner.discovery")

    agent = await start_agent(default_organization_id="org-default")

    found = await _wait_for_sandbox(manager, labelled.name, _in_state(SandboxState.STARTED))
    assert (found.runner_id, found.organization_id, found.ephemeral) == (agent.settings.runner_id, "org-default", False)
    tagged = await _wait_for_sandbox(manager, with_org.name, _in_state(SandboxState.STARTED))
    assert (tagged.organization_id, tagged.ephemeral) == ("org-label", True)
    assert await _sandbox(manager, unlabelled.name) is None
    assert await _sandbox(manager, invalid.name) is None
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not any(invalid.name in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, "the agent did not log the skipped container"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_stop_and_remove_reach_manager(
    manager: BackupManager, start_agent: Callable[..., Any], containers: Callable[..., Any]
) -> None:
    await add_registry(manager)
    container = containers()
    await start_agent()
    await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STARTED))

    # No due check runs: a running sandbox that was never backed up is queued as it is recorded.
    started = await _wait_for_sandbox(manager, container.name, lambda sandbox: sandbox is not None and sandbox.backup_state != SandboxBackupState.NONE)
    assert started.backup_state == SandboxBackupState.PENDING

    await asyncio.to_thread(container.stop, timeout=1)

    # The queued attempt is not dispatched yet, so it runs after the stop and covers it: the stop
    # queues no second attempt.
    stopped = await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STOPPED))
    assert stopped.backup_state == SandboxBackupState.PENDING
    [attempt] = await _history(manager, container.name)
    assert attempt.state == BackupState.PENDING

    await asyncio.to_thread(container.remove, force=True)

    destroyed = await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.DESTROYED))
    assert destroyed.desired_state == SandboxState.DESTROYED
    # The state is committed before the destroy cancels the queued attempt.
    [cancelled] = await _wait_for_history(manager, container.name, lambda history: history[0].state != BackupState.PENDING)
    assert cancelled.state == BackupState.ERROR
    assert "destroyed" in cancelled.error_reason


@pytest.mark.slow
async def test_agent_with_wrong_token_rejected(
    manager: BackupManager, manager_url: str, runner_agent_factory: Callable[..., Any], containers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    container = containers()
    await add_runner(manager, "runner-wrong", token="the-registered-token")
    caplog.set_level(logging.ERROR, logger="sandbox_backup.runner.discovery")

    await asyncio.to_thread(runner_agent_factory, runner_id="runner-wrong", token="another-token", manager_url=manager_url)

    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not any("401" in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, "the agent did not log the rejected inventory"
        await asyncio.sleep(0.05)
    assert await _sandbox(manager, container.name) is None
    assert not any("another-token" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
async def test_new_container_reported_by_event(manager: BackupManager, start_agent: Callable[..., Any], containers: Callable[..., Any]) -> None:
    await start_agent()

    container = await asyncio.to_thread(containers)

    found = await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STARTED))
    assert found.organization_id == "default"


@pytest.mark.slow
async def test_engine_restart_is_recovered(
    manager: BackupManager,
    start_agent: Callable[..., Any],
    containers: Callable[..., Any],
    podman_engine: PodmanEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    container = containers()
    await start_agent()
    await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STARTED))
    caplog.set_level(logging.WARNING, logger="sandbox_backup.runner.discovery")

    # Only the API service stops; the container keeps running. It is stopped while the service
    # is down, so no event of the stop reaches the agent: only the inventory sent after the
    # reconnect can tell the manager.
    pid = (podman_engine.dir / "podman.pid").read_text().strip()
    await asyncio.to_thread(run_podman_sh, "stop_pid", pid, env=podman_engine.env)
    try:
        await asyncio.to_thread(podman_engine.podman, "stop", "--time", "1", container.name)
        await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile
    finally:
        # The service is shared by the whole session, so it must run again whatever happened.
        await asyncio.to_thread(run_podman_sh, "podman_service_start", str(podman_engine.dir), env=podman_engine.env)

    await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STOPPED))
    messages = [record.getMessage() for record in caplog.records]
    assert any("event stream ended" in message for message in messages), messages
    assert any("opening the engine's event stream failed" in message for message in messages), messages

    # The reconnected stream delivers the next change as an event.
    await asyncio.to_thread(podman_engine.client.api.start, container.name)
    await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STARTED))


@pytest.mark.slow
async def test_periodic_inventory_corrects_state(manager: BackupManager, start_agent: Callable[..., Any], containers: Callable[..., Any]) -> None:
    container = containers()
    await start_agent(inventory_interval_s=1.0)
    sandbox = await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STARTED))

    # The manager's record drifts with no engine event, as after a lost message.
    async with manager.ctx.db.transaction() as session:
        await sandboxes.set_state(session, sandbox, SandboxState.ERROR, now=manager.ctx.now())

    await _wait_for_sandbox(manager, container.name, _in_state(SandboxState.STARTED), timeout_s=10.0)
