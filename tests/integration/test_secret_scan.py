"""No secret in any log record or API response of a whole backup, archive, restore and destroy story.

Real parts as in test_restore.py: two runner agents on two private Podman services, the
real registry with basic auth, and the manager's API on loopback. Every log record of every
logger is captured at DEBUG and formatted both as JSON and as text. Every response body that
the API sent during the story is kept, and every list endpoint is read after the restore and
after the destroy. None may contain the registry password, a runner token or the API token,
plain or as base64 basic-auth credentials.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest

from sandbox_backup.domain.states import BackupState, SandboxState
from sandbox_backup.logs import JsonFormatter, TextFormatter
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, sandboxes
from tests.fixtures.live import register_registry, register_runner, register_sandbox
from tests.fixtures.manager import API_TOKEN
from tests.fixtures.podman import write_container_file

pytestmark = pytest.mark.slow


def _encodings(secret: str) -> set[str]:
    """Return the secret and its base64 forms (standard and URL-safe, with and without padding)."""
    forms = {secret}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(secret.encode()).decode()
        forms |= {encoded, encoded.rstrip("=")}
    return forms


class EveryLogRecord:
    """A capture of the records of every logger at DEBUG, also of loggers that do not propagate."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self._saved: dict[logging.Logger, tuple[int, bool]] = {}

    def apply(self) -> None:
        """Set every logger to DEBUG; call again after something (uvicorn) reconfigured logging."""
        self.caplog.set_level(logging.DEBUG)
        for logger in list(logging.root.manager.loggerDict.values()):
            if not isinstance(logger, logging.Logger):
                continue
            self._saved.setdefault(logger, (logger.level, logger.disabled))
            logger.setLevel(logging.DEBUG)
            logger.disabled = False
            if not logger.propagate and self.caplog.handler not in logger.handlers:
                logger.addHandler(self.caplog.handler)

    def records(self) -> list[logging.LogRecord]:
        # pytest keeps one list per test phase; the fixtures' registrations run in "setup".
        return self.caplog.get_records("setup") + self.caplog.get_records("call")

    def restore(self) -> None:
        for logger, (level, disabled) in self._saved.items():
            logger.setLevel(level)
            logger.disabled = disabled
            if self.caplog.handler in logger.handlers:
                logger.removeHandler(self.caplog.handler)


@pytest.fixture
def every_log_record(caplog: pytest.LogCaptureFixture) -> Iterator[EveryLogRecord]:
    capture = EveryLogRecord(caplog)
    capture.apply()
    yield capture
    capture.restore()


class Story:
    """The manager, its API client that keeps every response, and the two nodes."""

    def __init__(self, manager: BackupManager, api: httpx.AsyncClient, clock: Any, node1: Any, node2: Any, container: Any) -> None:
        self.manager = manager
        self.api = api
        self.clock = clock
        self.node1, self.node2 = node1, node2
        self.container = container
        self.sandbox_id = container.name
        self.responses: list[str] = []

    async def keep_response(self, response: httpx.Response) -> None:
        await response.aread()
        self.responses.append(f"{response.request.method} {response.request.url} -> {response.status_code}\n{response.text}")

    async def newest_backup(self):  # type: ignore[no-untyped-def]
        async with self.manager.ctx.db.transaction() as session:
            return (await backups.list_for_sandbox(session, self.sandbox_id))[0]

    async def sandbox(self):  # type: ignore[no-untyped-def]
        async with self.manager.ctx.db.transaction() as session:
            return await sandboxes.get_sandbox(session, self.sandbox_id)

    async def dispatch_and_wait(self, timeout_s: float = 60.0) -> None:
        self.clock.advance(1)
        assert await self.manager.dispatch_pending() == 1
        deadline = time.monotonic() + timeout_s
        while True:
            newest = await self.newest_backup()
            if newest.state not in (BackupState.PENDING, BackupState.IN_PROGRESS):
                assert newest.state == BackupState.COMPLETED, newest.error_reason
                return
            assert time.monotonic() < deadline, f"backup still {newest.state}"
            await asyncio.sleep(0.1)

    async def event(self, kind: str) -> None:
        response = await self.api.post(f"/api/v1/sandboxes/{self.sandbox_id}/events", json={"type": kind})
        assert response.status_code == 200, response.text


@pytest.fixture
async def story(every_log_record, manager, manager_url, manager_api, clock, runner_agent_factory, sandbox_container, podman_engine, second_podman_engine, registry_server):  # type: ignore[no-untyped-def]
    node1 = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url, runner_id="node-1")
    node2 = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url, runner_id="node-2", docker_host=second_podman_engine.docker_host)
    every_log_record.apply()  # uvicorn set its own loggers' levels when the agents started
    container = sandbox_container()
    story = Story(manager, manager_api, clock, node1, node2, container)
    manager_api.event_hooks = {"request": [], "response": [story.keep_response]}
    await register_runner(manager_api, node1)
    await register_runner(manager_api, node2)
    await register_registry(manager_api, registry_server.url, registry_server)
    await register_sandbox(manager_api, container.name, "node-1")
    yield story
    for engine in (podman_engine, second_podman_engine):
        try:
            engine.client.api.remove_container(container.name, force=True)
        except docker.errors.NotFound:
            pass


async def _read_every_list(story: Story, restore_id: str) -> None:
    api = story.api
    sandbox_path = f"/api/v1/sandboxes/{story.sandbox_id}"
    paths = [
        "/health",
        "/metrics",
        "/api/v1/runners",
        "/api/v1/registries",
        "/api/v1/sandboxes",
        sandbox_path,
        f"{sandbox_path}/backups",
        f"{sandbox_path}/restores",
        f"{sandbox_path}/retention",
        f"/api/v1/restores/{restore_id}",
        "/api/v1/runners/node-1/drain",
        "/api/v1/runners/node-2/drain",
    ]
    for path in paths:
        response = await api.get(path)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
    for backup in (await api.get(f"{sandbox_path}/backups")).json():
        assert (await api.get(f"/api/v1/backups/{backup['id']}")).status_code == 200

    # The agents' own read endpoints, with their tokens.
    for node in (story.node1, story.node2):
        async with httpx.AsyncClient(base_url=node.url, headers=node.headers, timeout=30) as agent_api:
            for path in ("/agent/sandboxes", "/agent/health", f"/sandboxes/{story.sandbox_id}"):
                response = await agent_api.get(path)
                story.responses.append(f"GET {node.url}{path} -> {response.status_code}\n{response.text}")


async def test_story_leaks_no_secret(story: Story, registry_server: Any, every_log_record: EveryLogRecord) -> None:
    write_container_file(story.container, "/data/note.txt", b"secret scan")
    story.clock.advance(60)
    assert (await story.api.post(f"/api/v1/sandboxes/{story.sandbox_id}/backup")).status_code == 202
    await story.dispatch_and_wait()

    await story.event("archive_requested")
    await story.dispatch_and_wait()
    assert await story.manager.finish_archives() == 1
    assert (await story.sandbox()).state == SandboxState.ARCHIVED

    await story.event("started")
    assert await story.manager.run_restores() == 1
    assert (await story.sandbox()).state == SandboxState.STARTED
    restores = (await story.api.get(f"/api/v1/sandboxes/{story.sandbox_id}/restores")).json()
    assert [restore["state"] for restore in restores] == ["COMPLETED"]

    # The other job bodies also talk to the runners and the registry.
    await story.manager.sync_progress()
    await story.manager.probe_runners()
    await story.manager.verify()
    await story.manager.prune()
    await _read_every_list(story, restores[0]["id"])

    await story.event("destroyed")
    story.clock.advance(60)
    await story.manager.work_cleanup()
    assert (await story.api.get(f"/api/v1/sandboxes/{story.sandbox_id}")).status_code == 200
    await _read_every_list(story, restores[0]["id"])

    secrets = {
        "registry password": _encodings(registry_server.password),
        "registry basic auth": _encodings(f"{registry_server.username}:{registry_server.password}"),
        "runner token of node-1": _encodings(story.node1.token),
        "runner token of node-2": _encodings(story.node2.token),
        "API token": _encodings(API_TOKEN),
    }
    json_formatter, text_formatter = JsonFormatter(), TextFormatter()
    records = every_log_record.records()
    # The capture reached the agents' threads, the manager, and the HTTP and SQL libraries.
    logger_names = {record.name for record in records}
    for expected in ("sandbox_backup.runner.backup", "sandbox_backup.api.app", "sandbox_backup.manager.restore", "httpx", "sqlalchemy.engine.Engine"):
        assert expected in logger_names
    texts = [("response", body) for body in story.responses]
    for record in records:
        where = f"log record {record.name}:{record.lineno}"
        texts.append((where, json_formatter.format(record)))
        texts.append((where, text_formatter.format(record)))
    assert len(story.responses) > 20

    # One entry per secret and place, with the first text that showed it.
    leaks: dict[str, str] = {}
    for where, text in texts:
        for name, forms in secrets.items():
            if any(form in text for form in forms):
                leaks.setdefault(f"{name} in {where}", text[:300])
    assert not leaks, "secrets leaked:\n" + "\n".join(f"{place}: {sample}" for place, sample in sorted(leaks.items()))
