"""The manager's RunnerClient against the real runner agent on Podman."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_backup import errors
from sandbox_backup.runner.client import RunnerClient
from sandbox_backup.runner.models import (
    CreateSandboxRequest,
    RegistryCredentials,
    RunnerBackupState,
    RunnerSandboxState,
)
from tests.fixtures.podman import MINI_IMAGE, RunnerAgent, backup_snapshot, wait_for_backup
from tests.fixtures.registry_servers import RegistryServer


def credentials(registry: RegistryServer, *, password: str | None = None) -> RegistryCredentials:
    return RegistryCredentials(
        url=registry.url,
        project="runner-test",
        username=registry.username,
        password=password if password is not None else registry.password,
    )


async def test_client_backs_up_and_reads_state(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    snapshot = backup_snapshot(registry_server.url, container.name)

    async with runner_agent.client() as client:
        before = await client.get_sandbox(container.name)
        await client.create_backup(container.name, credentials(registry_server), snapshot)
        wait_for_backup(runner_agent, container.name)
        after = await client.get_sandbox(container.name)

    assert before is not None
    assert before.state is RunnerSandboxState.STARTED
    assert before.backup_state is RunnerBackupState.NONE
    assert after is not None
    assert after.backup_state is RunnerBackupState.COMPLETED
    assert after.backup_snapshot == snapshot
    assert after.backup_digest is not None and after.backup_digest.startswith("sha256:")


async def test_client_get_unknown_sandbox_returns_none(runner_agent: RunnerAgent) -> None:
    async with runner_agent.client() as client:
        assert await client.get_sandbox("sb-unknown") is None


async def test_client_sandbox_lifecycle(runner_agent: RunnerAgent, sandbox_container: Any) -> None:
    request = CreateSandboxRequest(
        id="sb-client-lifecycle",
        os_user="root",
        snapshot=MINI_IMAGE,
        user_id="user-1",
        entrypoint=["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
    )
    async with runner_agent.client() as client:
        try:
            await client.create_sandbox(request)
            await client.stop_sandbox(request.id)
            stopped = await client.get_sandbox(request.id)
            await client.start_sandbox(request.id)
            started = await client.get_sandbox(request.id)
        finally:
            await client.destroy_sandbox(request.id)
        after_destroy = await client.get_sandbox(request.id)

    assert stopped is not None and stopped.state is RunnerSandboxState.STOPPED
    assert started is not None and started.state is RunnerSandboxState.STARTED
    assert after_destroy is None


async def test_client_maps_404_to_rejected(runner_agent: RunnerAgent, registry_server: RegistryServer) -> None:
    snapshot = backup_snapshot(registry_server.url, "sb-missing")

    async with runner_agent.client() as client:
        with pytest.raises(errors.RunnerRejected) as raised:
            await client.create_backup("sb-missing", credentials(registry_server), snapshot)

    assert raised.value.status_code == 404
    assert raised.value.runner_id == runner_agent.settings.runner_id
    assert "sb-missing" in str(raised.value)
    assert raised.value.transient is False


async def test_client_with_wrong_token_is_rejected(runner_agent: RunnerAgent) -> None:
    async with RunnerClient(runner_agent.url, "wrong-token") as client:
        with pytest.raises(errors.RunnerRejected) as raised:
            await client.get_sandbox("sb-any")

    assert raised.value.status_code == 401
    assert "wrong-token" not in str(raised.value)


async def test_client_rejection_hides_password(
    runner_agent: RunnerAgent, sandbox_container: Any, registry_server: RegistryServer
) -> None:
    container = sandbox_container()
    secret = "secret-password-0815"
    other_host_snapshot = "127.0.0.1:1/runner-test/backup-x:t1"

    async with runner_agent.client() as client:
        with pytest.raises(errors.RunnerRejected) as raised:
            registry = credentials(registry_server, password=secret)
            await client.create_backup(container.name, registry, other_host_snapshot)

    assert raised.value.status_code == 400
    assert secret not in str(raised.value)
    assert runner_agent.token not in str(raised.value)


async def test_client_of_stopped_agent_is_unavailable(runner_agent: RunnerAgent) -> None:
    runner_agent.stop()

    async with runner_agent.client(timeout_s=2.0) as client:
        with pytest.raises(errors.RunnerUnavailable) as raised:
            await client.get_sandbox("sb-any")
        healthy = await client.health()

    assert raised.value.transient is True
    assert runner_agent.token not in str(raised.value)
    assert healthy is False


async def test_client_health_of_running_agent(runner_agent: RunnerAgent) -> None:
    async with runner_agent.client() as client:
        assert await client.health() is True
