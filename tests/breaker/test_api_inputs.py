"""Bad input to the manager API: every case must get a 4xx response and change nothing.

Each test here fails today because of a product bug; the comment above each assert states the
correct behaviour. Several fail only on PostgreSQL, which enforces column lengths and rejects
NUL characters where SQLite does not.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sandbox_backup.domain.states import BackupState
from sandbox_backup.manager.service import BackupManager
from tests.breaker.helpers import DIGEST, claim_all, history, post_report
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


# SQLite accepts these inputs; only PostgreSQL turns them into a 500.
postgresql_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def _is_client_error(response: httpx.Response) -> bool:
    return 400 <= response.status_code < 500


async def test_long_sandbox_fields_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")

    # The columns hold 128 characters. Correct: a longer organizationId or region gets a 4xx response
    # on both backends. Today SQLite stores it (200) and PostgreSQL raises DBAPIError (500).
    too_long_org = await api.put("/api/v1/sandboxes/sb-1", json={"state": "STARTED", "runnerId": "r1", "organizationId": "o" * 300})
    assert _is_client_error(too_long_org)
    too_long_region = await api.put("/api/v1/sandboxes/sb-2", json={"state": "STARTED", "runnerId": "r1", "region": "r" * 300})
    assert _is_client_error(too_long_region)


async def test_long_runner_and_registry_fields_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Correct: values longer than their columns (token 1024, region 128, username 255) get 4xx.
    # Today SQLite stores them and PostgreSQL returns 500.
    long_token = await api.put("/api/v1/runners/r1", json={"apiUrl": "http://127.0.0.1:9", "token": "t" * 2000})
    assert _is_client_error(long_token)
    long_region = await api.put("/api/v1/runners/r2", json={"apiUrl": "http://127.0.0.1:9", "token": "t", "region": "r" * 300})
    assert _is_client_error(long_region)
    long_username = await api.put("/api/v1/registries/g1", json={"url": "http://127.0.0.1:9", "username": "u" * 300})
    assert _is_client_error(long_username)


@postgresql_only
async def test_nul_in_path_ids_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Correct: an id with a NUL character names nothing, so 404 (or 400). Today PostgreSQL rejects
    # the query parameter ("invalid byte sequence for encoding UTF8: 0x00") and the API returns 500.
    for method, path in [
        ("GET", "/api/v1/sandboxes/a%00b"),
        ("GET", "/api/v1/backups/a%00b"),
        ("POST", "/api/v1/sandboxes/a%00b/backup"),
    ]:
        response = await api.request(method, path)
        assert response.status_code in (400, 404), (method, path, response.status_code)


@postgresql_only
async def test_nul_in_body_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")

    # Correct: 4xx for a NUL character in a string field, or store it. Today PostgreSQL returns 500.
    nul_org = await api.put("/api/v1/sandboxes/sb-1", json={"state": "STARTED", "runnerId": "r1", "organizationId": "a\x00b"})
    assert nul_org.status_code < 500
    nul_report = await post_report(api, "r1", {"sandboxId": "sb\x00", "snapshot": "x", "state": "COMPLETED"})
    assert nul_report.status_code < 500


async def test_huge_list_offset_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Correct: an offset past the 64-bit range is a 4xx (or an empty page). Today both backends
    # fail to bind it (OverflowError on SQLite, DBAPIError on PostgreSQL), a 500.
    response = await api.get("/api/v1/sandboxes", params={"offset": str(10**20)})
    assert response.status_code in (200, 400, 422)


@postgresql_only
async def test_concurrent_first_put_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")

    # Five platform workers register the same new sandbox, runner and registry at once.
    # Correct: each PUT is 200 (an upsert) or 409. Today on PostgreSQL all but one hit the
    # primary key (IntegrityError), a 500, because the upserts read-then-insert without a lock.
    sandbox_body = {"state": "STARTED", "runnerId": "r1", "organizationId": "o"}
    runner_body = {"apiUrl": "http://127.0.0.1:9", "token": "t"}
    registry_body = {"url": "http://127.0.0.1:9"}
    for path, body in [("/api/v1/sandboxes/new-1", sandbox_body), ("/api/v1/runners/new-r", runner_body), ("/api/v1/registries/new-g", registry_body)]:
        responses = await asyncio.gather(*(api.put(path, json=body) for _ in range(5)), return_exceptions=True)
        statuses = [getattr(response, "status_code", type(response).__name__) for response in responses]
        assert all(status in (200, 409) for status in statuses), (path, statuses)


async def test_empty_runner_token_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Correct: an empty token is invalid input (4xx), because reports authenticate with it.
    # Today it is stored, and any caller without an Authorization header can then end the
    # runner's attempts.
    registered = await api.put("/api/v1/runners/r0", json={"apiUrl": "http://127.0.0.1:9", "token": ""})
    assert _is_client_error(registered)


async def test_unauthenticated_report_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await api.put("/api/v1/runners/r0", json={"apiUrl": "http://127.0.0.1:9", "token": ""})
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r0")
    await manager.check_running_due()
    await claim_all(manager)
    attempt = (await history(manager, "sb-1"))[0]

    report = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": DIGEST}
    async with httpx.AsyncClient(transport=api._transport, base_url="http://manager") as anonymous:
        response = await anonymous.post("/api/v1/runners/r0/reports", json=report)

    # Correct: a report without a bearer token is 401 and changes nothing. Today the empty
    # registered token matches the empty header and the attempt is marked COMPLETED.
    assert response.status_code == 401
    assert (await history(manager, "sb-1"))[0].state == BackupState.IN_PROGRESS


async def test_report_values_validated(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await add_sandbox(manager, "sb-2", runner_id="r1")
    await manager.check_running_due()
    await claim_all(manager)
    first = (await history(manager, "sb-1"))[0]
    second = (await history(manager, "sb-2"))[0]

    # Correct: a size past the 64-bit column is a 4xx. Today both backends fail to bind it (500).
    huge_size = await post_report(api, "r1", {"sandboxId": "sb-1", "snapshot": first.image_ref, "state": "COMPLETED", "digest": DIGEST, "sizeBytes": 10**30})
    assert _is_client_error(huge_size)

    # Correct: a digest outside the OCI grammar (algorithm:encoded) and a negative size are
    # rejected, and the attempt stays IN_PROGRESS. Today the attempt is COMPLETED with
    # manifest digest "not a digest" and size -5.
    bogus = await post_report(api, "r1", {"sandboxId": "sb-2", "snapshot": second.image_ref, "state": "COMPLETED", "digest": "not a digest", "sizeBytes": -5})
    assert _is_client_error(bogus)
    assert (await history(manager, "sb-2"))[0].state == BackupState.IN_PROGRESS


async def test_registry_url_credentials_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Correct: 4xx, as RegistryClient itself rejects a URL with userinfo ("registry url must not
    # contain credentials"). Today the API stores it and returns the password in `url`, and every
    # image reference of the registry then carries "user:secretpw@" in its host part.
    response = await api.put("/api/v1/registries/g1", json={"url": "http://user:secretpw@127.0.0.1:9"})
    assert "secretpw" not in response.text
    assert _is_client_error(response)


async def test_registry_invalid_project_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Correct: a project that cannot form an OCI repository name is rejected at registration.
    # Today it is stored, and every later attempt for the registry raises InvalidReference.
    response = await api.put("/api/v1/registries/g1", json={"url": "http://127.0.0.1:9", "project": "Bad Project"})
    assert _is_client_error(response)

