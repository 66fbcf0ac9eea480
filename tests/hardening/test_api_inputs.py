"""Bad input to the manager API: no case may cause a 5xx response, and most must get a 4xx.

PostgreSQL enforces column lengths and rejects NUL characters where SQLite does not, so some
cases run only on PostgreSQL.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sandbox_backup.domain.states import BackupState
from sandbox_backup.manager.service import BackupManager
from tests.hardening.helpers import DIGEST, claim_all, history, post_report
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


# These inputs cause database errors only on PostgreSQL: NUL in text, and concurrent inserts of one primary key.
postgresql_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def _is_client_error(response: httpx.Response) -> bool:
    return 400 <= response.status_code < 500


async def test_long_sandbox_fields_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")

    # The columns hold 128 characters, so a longer organizationId or region gets a 4xx response
    # on both backends.
    too_long_org = await api.put("/api/v1/sandboxes/sb-1", json={"state": "STARTED", "runnerId": "r1", "organizationId": "o" * 300})
    assert _is_client_error(too_long_org)
    too_long_region = await api.put("/api/v1/sandboxes/sb-2", json={"state": "STARTED", "runnerId": "r1", "region": "r" * 300})
    assert _is_client_error(too_long_region)


async def test_long_runner_and_registry_fields_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # Values longer than their columns (token 1024, region 128, username 255 characters) get a
    # 4xx response.
    long_token = await api.put("/api/v1/runners/r1", json={"apiUrl": "http://127.0.0.1:9", "token": "t" * 2000})
    assert _is_client_error(long_token)
    long_region = await api.put("/api/v1/runners/r2", json={"apiUrl": "http://127.0.0.1:9", "token": "t", "region": "r" * 300})
    assert _is_client_error(long_region)
    long_username = await api.put("/api/v1/registries/g1", json={"url": "http://127.0.0.1:9", "username": "u" * 300})
    assert _is_client_error(long_username)


@postgresql_only
async def test_nul_in_path_ids_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # An id with a NUL character names nothing, so the response is 404 (or 400). PostgreSQL
    # cannot store NUL in text and rejects such a query parameter ("invalid byte sequence for
    # encoding UTF8: 0x00").
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

    # A string field with a NUL character gets a 4xx response or is stored, and never causes a 5xx.
    nul_org = await api.put("/api/v1/sandboxes/sb-1", json={"state": "STARTED", "runnerId": "r1", "organizationId": "a\x00b"})
    assert nul_org.status_code < 500
    nul_report = await post_report(api, "r1", {"sandboxId": "sb\x00", "snapshot": "x", "state": "COMPLETED"})
    assert nul_report.status_code < 500


async def test_huge_list_offset_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # An offset past the 64-bit integer range gets a 4xx response or an empty page, because
    # neither database can bind it as a query parameter.
    response = await api.get("/api/v1/sandboxes", params={"offset": str(10**20)})
    assert response.status_code in (200, 400, 422)


@postgresql_only
async def test_concurrent_first_put_not_500(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")

    # Five platform workers register the same new sandbox, runner and registry at once.
    # Each PUT gets 200 (an upsert) or 409, although only one of the concurrent inserts can
    # create the row under that primary key.
    sandbox_body = {"state": "STARTED", "runnerId": "r1", "organizationId": "o"}
    runner_body = {"apiUrl": "http://127.0.0.1:9", "token": "runner-token-1"}
    registry_body = {"url": "http://127.0.0.1:9"}
    for path, body in [("/api/v1/sandboxes/new-1", sandbox_body), ("/api/v1/runners/new-r", runner_body), ("/api/v1/registries/new-g", registry_body)]:
        responses = await asyncio.gather(*(api.put(path, json=body) for _ in range(5)), return_exceptions=True)
        statuses = [getattr(response, "status_code", type(response).__name__) for response in responses]
        assert all(status in (200, 409) for status in statuses), (path, statuses)


async def test_empty_runner_token_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # An empty token is invalid input (4xx), because reports authenticate with it.
    registered = await api.put("/api/v1/runners/r0", json={"apiUrl": "http://127.0.0.1:9", "token": ""})
    assert _is_client_error(registered)


async def test_unauthenticated_report_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r0")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r0")
    await manager.check_running_due()
    await claim_all(manager)
    attempt = (await history(manager, "sb-1"))[0]

    report = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": DIGEST}
    async with httpx.AsyncClient(transport=api._transport, base_url="http://manager") as anonymous:
        response = await anonymous.post("/api/v1/runners/r0/reports", json=report)

    # A report without a bearer token is 401 and changes nothing.
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

    # A sizeBytes past the range of the 64-bit column gets a 4xx response.
    huge_size = await post_report(api, "r1", {"sandboxId": "sb-1", "snapshot": first.image_ref, "state": "COMPLETED", "digest": DIGEST, "sizeBytes": 10**30})
    assert _is_client_error(huge_size)

    # A digest outside the OCI grammar (algorithm:encoded) and a negative size are rejected,
    # and the attempt stays IN_PROGRESS.
    bogus = await post_report(api, "r1", {"sandboxId": "sb-2", "snapshot": second.image_ref, "state": "COMPLETED", "digest": "not a digest", "sizeBytes": -5})
    assert _is_client_error(bogus)
    assert (await history(manager, "sb-2"))[0].state == BackupState.IN_PROGRESS


async def test_registry_url_credentials_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # A URL with userinfo gets a 4xx response that does not echo the password, because
    # RegistryClient rejects such a URL ("registry url must not contain credentials") and the
    # image references built from it would carry the password.
    response = await api.put("/api/v1/registries/g1", json={"url": "http://user:secretpw@127.0.0.1:9"})
    assert "secretpw" not in response.text
    assert _is_client_error(response)


async def test_registry_invalid_project_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    # A project that cannot form an OCI repository name is rejected at registration, because
    # every backup to that registry would fail with InvalidReference.
    response = await api.put("/api/v1/registries/g1", json={"url": "http://127.0.0.1:9", "project": "Bad Project"})
    assert _is_client_error(response)

