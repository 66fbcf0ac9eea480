"""Graceful shutdown: SIGTERM on real `sandbox-backup serve` and `runner serve` processes, and a restart mid-dispatch.

In the manager tests the runner is a listening socket that never accepts, so a backup call to it
hangs until the caller gives up, which keeps the dispatch job's body running while the manager
stops. The agent tests stall the push with a held TCP gate in front of the real registry.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox_backup.coordination import keys
from sandbox_backup.domain.states import BackupState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.runner.models import RunnerBackupState
from sandbox_backup.runner.state import BackupStateStore
from sandbox_backup.store import backups
from tests.fixtures.live import free_port
from tests.fixtures.manager import ManagerFactory, add_registry, add_runner, add_sandbox
from tests.fixtures.podman import backup_snapshot

API_TOKEN = "shutdown-test-token"
GRACE_S = 3.0


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    return sqlite_database_url


@pytest.fixture
def silent_runner() -> Iterator[str]:
    """A loopback address that takes TCP connections (the kernel backlog) but never responds."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


class _NotFoundHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        body = b'{"message": "not found", "statusCode": 404}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


@pytest.fixture
def restarted_runner() -> Iterator[str]:
    """A runner that restarted empty: it returns 404 for every sandbox."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _log_entries(stderr: str) -> list[dict[str, object]]:
    entries = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


async def _wait_for(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_serve_drains_and_exits_on_sigterm(tmp_path: Path, silent_runner: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SANDBOX_BACKUP_DATA_DIR": str(tmp_path / "data"),
        "SANDBOX_BACKUP_API_TOKEN": API_TOKEN,
        "SANDBOX_BACKUP_API_HOST": "127.0.0.1",
        "SANDBOX_BACKUP_API_PORT": str(port),
        "SANDBOX_BACKUP_LOG_JSON": "true",
        "SANDBOX_BACKUP_SHUTDOWN_GRACE_S": str(GRACE_S),
        # Longer than the grace period, so the dispatch body is still waiting at the deadline.
        "SANDBOX_BACKUP_RUNNER_TIMEOUT_S": "60",
    }
    env.pop("SANDBOX_BACKUP_DATABASE_URL", None)
    env.pop("SANDBOX_BACKUP_COORDINATION_URL", None)
    env.pop("SANDBOX_BACKUP_CONFIG_FILE", None)
    (tmp_path / "data").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox_backup.cli.main", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as api:

            async def healthy() -> bool:
                assert process.poll() is None, "the manager exited during start-up"
                try:
                    return (await api.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await _wait_for(healthy)
            assert (await api.put("/api/v1/runners/r1", json={"apiUrl": silent_runner, "token": "runner-secret"})).status_code == 200
            registry = {"url": "http://127.0.0.1:9", "project": "backups", "isDefault": True}
            assert (await api.put("/api/v1/registries/main", json=registry)).status_code == 200
            sandbox = {"state": "STARTED", "runnerId": "r1", "organizationId": "org"}
            assert (await api.put("/api/v1/sandboxes/sb-1", json=sandbox)).status_code == 200
            assert (await api.post("/api/v1/sandboxes/sb-1/backup")).status_code == 202

            async def dispatched() -> bool:
                rows = (await api.get("/api/v1/sandboxes/sb-1/backups")).json()
                return any(row["state"] == "IN_PROGRESS" for row in rows)

            await _wait_for(dispatched)
            signalled_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)

            # Draining: reads still work, writes are rejected, reports are still taken.
            assert process.poll() is None
            assert (await api.get("/api/v1/sandboxes/sb-1")).status_code == 200
            rejected = await api.post("/api/v1/sandboxes/sb-1/backup")
            assert rejected.status_code == 503
            assert "shutting down" in rejected.json()["detail"]
            report = {"sandboxId": "sb-1", "snapshot": "x", "state": "COMPLETED"}
            report_response = await api.post("/api/v1/runners/r1/reports", json=report, headers={"Authorization": "Bearer runner-secret"})
            assert report_response.status_code != 503

        _, stderr = await asyncio.to_thread(process.communicate, timeout=GRACE_S + 20)
        elapsed = time.monotonic() - signalled_at
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert elapsed < GRACE_S + 10
    assert elapsed >= GRACE_S - 0.5
    entries = _log_entries(stderr)
    stopping = [entry for entry in entries if entry.get("action") == "manager_stopping"]
    stopped = [entry for entry in entries if entry.get("action") == "manager_stopped"]
    assert len(stopping) == 1, stderr
    assert stopping[0]["jobs_running"] == ["dispatch"]
    assert len(stopped) == 1, stderr
    assert stopped[0]["jobs_cancelled"] == ["dispatch"]


async def test_serve_exits_at_once_when_idle(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SANDBOX_BACKUP_DATA_DIR": str(tmp_path),
        "SANDBOX_BACKUP_API_TOKEN": API_TOKEN,
        "SANDBOX_BACKUP_API_PORT": str(port),
        "SANDBOX_BACKUP_API_HOST": "127.0.0.1",
        "SANDBOX_BACKUP_LOG_JSON": "true",
    }
    env.pop("SANDBOX_BACKUP_DATABASE_URL", None)
    env.pop("SANDBOX_BACKUP_COORDINATION_URL", None)
    env.pop("SANDBOX_BACKUP_CONFIG_FILE", None)
    process = subprocess.Popen([sys.executable, "-m", "sandbox_backup.cli.main", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:

            async def healthy() -> bool:
                assert process.poll() is None, "the manager exited during start-up"
                try:
                    return (await api.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await _wait_for(healthy)
        signalled_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=20)
        elapsed = time.monotonic() - signalled_at
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert elapsed < 5
    stopped = [entry for entry in _log_entries(stderr) if entry.get("action") == "manager_stopped"]
    assert [entry["jobs_cancelled"] for entry in stopped] == [[]]


async def _attempts(manager: BackupManager, sandbox_id: str):  # type: ignore[no-untyped-def]
    async with manager.ctx.db.transaction() as session:
        return await backups.list_for_sandbox(session, sandbox_id)


async def test_restart_reconciles_attempt_left_mid_dispatch(manager_factory: ManagerFactory, silent_runner: str, restarted_runner: str) -> None:
    # The first manager neither probes nor checks progress again after its first ticks.
    quiet = {"progress_interval_s": 3600, "runner_health_interval_s": 3600, "unknown_attempt_grace_s": 3600, "runner_timeout_s": 60}
    first = await manager_factory(**quiet)
    await add_runner(first, "r1", api_url=silent_runner)
    await add_registry(first)
    await add_sandbox(first, "sb-1", runner_id="r1")

    await first.start()
    dispatch_job = next(job for job in first.jobs if job.name == "dispatch")

    async def dispatching() -> bool:
        rows = await _attempts(first, "sb-1")
        return dispatch_job.body_running and [row.state for row in rows] == [BackupState.IN_PROGRESS]

    await _wait_for(dispatching)
    await first.stop(grace_s=0.5)

    assert first.draining
    assert not dispatch_job.body_running
    # The cancelled body left its lock: another holder gets it at once.
    async with first.ctx.coordinator.hold(keys.job_lock_name("dispatch"), ttl_s=30, renew=False):
        pass
    [left] = await _attempts(first, "sb-1")
    assert left.state == BackupState.IN_PROGRESS

    # A new manager on the same database queries the runner, which does not know the attempt
    # (404), so the attempt fails as lost and a retry is queued.
    second = await manager_factory(unknown_attempt_grace_s=0)
    await add_runner(second, "r1", api_url=restarted_runner)
    assert await second.sync_progress() == 1
    history = await _attempts(second, "sb-1")
    assert [row.state for row in history] == [BackupState.PENDING, BackupState.ERROR]
    assert history[1].id == left.id
    assert history[0].attempt == 2


def _start_agent(tmp_path: Path, docker_host: str, *, grace_s: float) -> tuple[subprocess.Popen[str], str, dict[str, str]]:
    """Start `sandbox-backup runner serve` on a free port; return the process, its URL and headers."""
    port = free_port()
    token = "agent-shutdown-token"
    env = {
        **os.environ,
        "SANDBOX_BACKUP_RUNNER_TOKEN": token,
        "SANDBOX_BACKUP_RUNNER_RUNNER_ID": "node-shutdown",
        "SANDBOX_BACKUP_RUNNER_HOST": "127.0.0.1",
        "SANDBOX_BACKUP_RUNNER_PORT": str(port),
        "SANDBOX_BACKUP_RUNNER_DOCKER_HOST": docker_host,
        "SANDBOX_BACKUP_RUNNER_STATE_PATH": str(tmp_path / "runner-state.sqlite3"),
        "SANDBOX_BACKUP_RUNNER_SHUTDOWN_GRACE_S": str(grace_s),
        "SANDBOX_BACKUP_LOG_JSON": "true",
    }
    env.pop("SANDBOX_BACKUP_RUNNER_MANAGER_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox_backup.cli.main", "runner", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(f"{url}/agent/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the agent did not start within 30 s"
        time.sleep(0.1)
    return process, url, {"Authorization": f"Bearer {token}"}


def _post_backup(url: str, headers: dict[str, str], sandbox_id: str, registry_url: str, registry: Any, snapshot: str) -> httpx.Response:
    body = {"registry": {"url": registry_url, "username": registry.username, "password": registry.password}, "snapshot": snapshot}
    return httpx.post(f"{url}/sandboxes/{sandbox_id}/backup", json=body, headers=headers, timeout=30)


@pytest.mark.slow
def test_agent_finishes_running_backup_on_sigterm(
    tmp_path: Path, podman_engine: Any, sandbox_container: Any, registry_server: Any, registry_gate: Any
) -> None:
    process, url, headers = _start_agent(tmp_path, podman_engine.docker_host, grace_s=60)
    container = sandbox_container()
    other = sandbox_container()
    snapshot = backup_snapshot(registry_gate.url, container.name)
    try:
        registry_gate.hold()
        connections_before = registry_gate.connection_count
        assert _post_backup(url, headers, container.name, registry_gate.url, registry_server, snapshot).status_code == 201
        registry_gate.wait_for_connections(connections_before + 1)

        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None
        rejected = _post_backup(url, headers, other.name, registry_gate.url, registry_server, backup_snapshot(registry_gate.url, other.name))
        assert rejected.status_code == 503
        assert rejected.json()["code"] == "SHUTTING_DOWN"
        info = httpx.get(f"{url}/sandboxes/{container.name}", headers=headers, timeout=10).json()
        assert info["backupState"] == "IN_PROGRESS"

        registry_gate.release()
        _, stderr = process.communicate(timeout=60)
    finally:
        registry_gate.release()
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    store = BackupStateStore(tmp_path / "runner-state.sqlite3")
    try:
        record = store.get(container.name)
        assert store.get(other.name) is None
    finally:
        store.close()
    assert record is not None
    assert record.state == RunnerBackupState.COMPLETED
    assert record.snapshot == snapshot
    assert "backup_drain" in {entry.get("action") for entry in _log_entries(stderr)}


@pytest.mark.slow
def test_agent_aborts_backup_after_grace(
    tmp_path: Path, podman_engine: Any, sandbox_container: Any, registry_server: Any, registry_gate: Any
) -> None:
    process, url, headers = _start_agent(tmp_path, podman_engine.docker_host, grace_s=1)
    container = sandbox_container()
    snapshot = backup_snapshot(registry_gate.url, container.name)
    try:
        registry_gate.hold()
        connections_before = registry_gate.connection_count
        assert _post_backup(url, headers, container.name, registry_gate.url, registry_server, snapshot).status_code == 201
        registry_gate.wait_for_connections(connections_before + 1)

        signalled_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled_at
    finally:
        registry_gate.release()
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert elapsed < 30
    # Aborted, so it stays IN_PROGRESS until the next start marks it FAILED.
    store = BackupStateStore(tmp_path / "runner-state.sqlite3")
    try:
        record = store.get(container.name)
    finally:
        store.close()
    assert record is not None
    assert record.state == RunnerBackupState.IN_PROGRESS
