"""Admin and read-only API tokens, and the filters and pages of the list endpoints, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa

from sandbox_backup.api.app import create_app
from sandbox_backup.config import ConfigError, load_settings
from sandbox_backup.domain.states import BackupState, BackupTrigger, SandboxBackupState, SandboxState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store.models import Backup, Sandbox
from tests.fixtures.manager import API_TOKEN, ManagerFactory, add_registry, add_runner, add_sandbox

READ_TOKEN = "test-read-token"


def _client(manager: BackupManager, token: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(manager))
    return httpx.AsyncClient(transport=transport, base_url="http://manager", headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
async def read_manager(manager_factory: ManagerFactory) -> BackupManager:
    return await manager_factory(api_read_token=READ_TOKEN)


@pytest.fixture
async def reader(read_manager: BackupManager) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(read_manager, READ_TOKEN) as client:
        yield client


@pytest.fixture
async def admin(read_manager: BackupManager) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(read_manager, API_TOKEN) as client:
        yield client


# --- tokens -------------------------------------------------------------------------------------


async def test_read_token_allows_get(read_manager: BackupManager, reader: httpx.AsyncClient) -> None:
    await add_runner(read_manager, "r1")
    await add_sandbox(read_manager, "sb-1", runner_id="r1")

    for path in ("/api/v1/sandboxes", "/api/v1/sandboxes/sb-1", "/api/v1/sandboxes/sb-1/backups", "/api/v1/runners", "/api/v1/registries"):
        response = await reader.get(path)
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/sandboxes/sb-1/backup", None),
        ("PUT", "/api/v1/runners/r2", {"apiUrl": "http://127.0.0.1:9", "token": "runner-token"}),
        ("PUT", "/api/v1/sandboxes/sb-2", {"state": "STARTED"}),
        ("POST", "/api/v1/prune", None),
    ],
)
async def test_read_token_forbids_writes(read_manager: BackupManager, reader: httpx.AsyncClient, method: str, path: str, body: object) -> None:
    await add_runner(read_manager, "r1")
    await add_sandbox(read_manager, "sb-1", runner_id="r1")

    response = await reader.request(method, path, json=body)

    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "Forbidden"
    assert "only GET" in error["message"]
    assert "api_token" in error["message"]


async def test_read_token_changes_nothing(read_manager: BackupManager, reader: httpx.AsyncClient, admin: httpx.AsyncClient) -> None:
    await add_runner(read_manager, "r1")
    await add_sandbox(read_manager, "sb-1", runner_id="r1")
    await add_registry(read_manager)

    assert (await reader.post("/api/v1/sandboxes/sb-1/backup")).status_code == 403
    assert (await reader.put("/api/v1/runners/r2", json={"apiUrl": "http://127.0.0.1:9", "token": "runner-token"})).status_code == 403

    assert (await admin.get("/api/v1/sandboxes/sb-1/backups")).json() == []
    assert [r["id"] for r in (await admin.get("/api/v1/runners")).json()] == ["r1"]


async def test_admin_token_allows_writes(read_manager: BackupManager, admin: httpx.AsyncClient) -> None:
    await add_runner(read_manager, "r1")
    await add_sandbox(read_manager, "sb-1", runner_id="r1")
    await add_registry(read_manager)

    response = await admin.post("/api/v1/sandboxes/sb-1/backup")

    assert response.status_code == 202, response.text


async def test_wrong_token_is_unauthorized(read_manager: BackupManager) -> None:
    async with _client(read_manager, "not-a-token") as client:
        response = await client.get("/api/v1/sandboxes")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "Unauthorized"


async def test_read_token_unset_rejects_it(manager: BackupManager) -> None:
    async with _client(manager, READ_TOKEN) as client:
        response = await client.get("/api/v1/sandboxes")

    assert response.status_code == 401


async def test_read_token_cannot_report(read_manager: BackupManager, reader: httpx.AsyncClient) -> None:
    """Runner report and discovery calls keep their per-runner token, so the read token gets 401 there."""
    await add_runner(read_manager, "r1")
    await add_sandbox(read_manager, "sb-1", runner_id="r1")
    report = {"sandboxId": "sb-1", "snapshot": "127.0.0.1:9/backups/sb-1:1", "state": "COMPLETED"}

    report_response = await reader.post("/api/v1/runners/r1/reports", json=report)
    inventory_response = await reader.put("/api/v1/runners/r1/sandboxes", json={"sandboxes": []})

    assert report_response.status_code == 401, report_response.text
    assert inventory_response.status_code == 401, inventory_response.text


def test_read_token_equal_admin_rejected() -> None:
    with pytest.raises(ConfigError, match="api_read_token must differ from api_token"):
        load_settings(api_token="same-token", api_read_token="same-token")


# --- sandbox list -------------------------------------------------------------------------------


async def _seed_sandboxes(manager: BackupManager) -> None:
    await add_runner(manager, "r1")
    await add_runner(manager, "r2")
    await add_sandbox(manager, "sb-a", runner_id="r1", organization_id="org-1")
    await add_sandbox(manager, "sb-b", runner_id="r1", organization_id="org-2", state=SandboxState.STOPPED)
    await add_sandbox(manager, "sb-c", runner_id="r2", organization_id="org-1")
    await add_sandbox(manager, "sb-d", runner_id="r2", organization_id="org-2", state=SandboxState.STOPPED)
    await add_sandbox(manager, "sb-e", runner_id="r2", organization_id=None)
    async with manager.ctx.db.transaction() as session:
        await session.execute(sa.update(Sandbox).where(Sandbox.id.in_(["sb-a", "sb-d"])).values(backup_state=SandboxBackupState.COMPLETED))


async def _ids(client: httpx.AsyncClient, path: str, **params: object) -> list[str]:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    return [row["id"] for row in response.json()]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["sb-a", "sb-b", "sb-c", "sb-d", "sb-e"]),
        ({"state": "STOPPED"}, ["sb-b", "sb-d"]),
        ({"backupState": "COMPLETED"}, ["sb-a", "sb-d"]),
        ({"backupState": "NONE"}, ["sb-b", "sb-c", "sb-e"]),
        ({"runnerId": "r2"}, ["sb-c", "sb-d", "sb-e"]),
        ({"organizationId": "org-1"}, ["sb-a", "sb-c"]),
        ({"runnerId": "r2", "state": "STARTED", "organizationId": "org-1"}, ["sb-c"]),
        ({"runnerId": "missing"}, []),
    ],
)
async def test_sandbox_list_filters(manager: BackupManager, api: httpx.AsyncClient, params: dict[str, str], expected: list[str]) -> None:
    await _seed_sandboxes(manager)

    assert await _ids(api, "/api/v1/sandboxes", **params) == expected


async def test_sandbox_list_pages(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await _seed_sandboxes(manager)

    assert await _ids(api, "/api/v1/sandboxes", limit=2) == ["sb-a", "sb-b"]
    assert await _ids(api, "/api/v1/sandboxes", limit=2, offset=2) == ["sb-c", "sb-d"]
    assert await _ids(api, "/api/v1/sandboxes", limit=2, offset=4) == ["sb-e"]
    assert await _ids(api, "/api/v1/sandboxes", runnerId="r2", limit=1, offset=1) == ["sb-d"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "RUNNING"}, "state"),
        ({"backupState": "DONE"}, "backupState"),
        ({"runnerId": ""}, "runnerId"),
        ({"organizationId": "x" * 129}, "organizationId"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
    ],
)
async def test_sandbox_list_rejects_bad_query(api: httpx.AsyncClient, params: dict[str, object], field: str) -> None:
    response = await api.get("/api/v1/sandboxes", params=params)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "InvalidInput"
    assert f"query.{field}" in error["message"]


# --- backup list --------------------------------------------------------------------------------


async def _seed_backups(manager: BackupManager) -> list[str]:
    """Store five attempts of sb-1, one minute apart, and return their ids newest first."""
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await add_sandbox(manager, "sb-2", runner_id="r1")
    states = [BackupState.COMPLETED, BackupState.ERROR, BackupState.COMPLETED, BackupState.ERROR, BackupState.PENDING]
    start = manager.ctx.now()
    ids = []
    async with manager.ctx.db.transaction() as session:
        for index, state in enumerate(states):
            created = start + datetime.timedelta(minutes=index)
            backup_id = f"00000000-0000-0000-0000-00000000000{index}"
            session.add(
                Backup(
                    id=backup_id, sandbox_id="sb-1", registry_id="main", image_ref=f"127.0.0.1:9/backups/sb-1:{index}",
                    trigger=BackupTrigger.SCHEDULE, state=state, attempt=1, next_attempt_at=created, created_at=created, updated_at=created, version=1,
                )
            )
            ids.append(backup_id)
        # Another sandbox's attempt must never show up in sb-1's list.
        session.add(
            Backup(
                id=str(uuid.uuid4()), sandbox_id="sb-2", registry_id="main", image_ref="127.0.0.1:9/backups/sb-2:0",
                trigger=BackupTrigger.SCHEDULE, state=BackupState.COMPLETED, attempt=1, next_attempt_at=start, created_at=start, updated_at=start, version=1,
            )
        )
    return list(reversed(ids))


async def test_backup_list_filters_and_pages(manager: BackupManager, api: httpx.AsyncClient) -> None:
    newest_first = await _seed_backups(manager)
    path = "/api/v1/sandboxes/sb-1/backups"

    assert await _ids(api, path) == newest_first
    assert await _ids(api, path, limit=2) == newest_first[:2]
    assert await _ids(api, path, limit=2, offset=2) == newest_first[2:4]
    assert await _ids(api, path, offset=5) == []
    assert await _ids(api, path, state="COMPLETED") == [newest_first[2], newest_first[4]]
    assert await _ids(api, path, state="ERROR", limit=1, offset=1) == [newest_first[3]]
    assert await _ids(api, path, state="IN_PROGRESS") == []


async def test_backup_list_rejects_bad_state(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await _seed_backups(manager)

    response = await api.get("/api/v1/sandboxes/sb-1/backups", params={"state": "NONE"})

    assert response.status_code == 422
    assert "query.state" in response.json()["error"]["message"]


async def test_backup_list_unknown_sandbox(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/sandboxes/missing/backups", params={"state": "COMPLETED"})

    assert response.status_code == 404
