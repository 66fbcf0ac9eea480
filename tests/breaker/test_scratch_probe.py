import asyncio
import httpx
import pytest

from sandbox_backup.domain.states import BackupState, SandboxBackupState, SandboxState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, sandboxes, cleanup
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


async def _claim_all(manager):
    ctx = manager.ctx
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=ctx.now(), default_cap=6, limit=10_000)
    out = []
    for c in candidates:
        async with ctx.db.transaction() as session:
            if await backups.claim(session, c, now=ctx.now()):
                out.append(c)
    return out


async def test_probe_inputs(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    results = {}
    cases = [
        ("PUT", "/api/v1/sandboxes/sb-1", {"state": "STARTED", "runnerId": "r1", "organizationId": "o" * 300}),
        ("PUT", "/api/v1/sandboxes/sb-2", {"state": "STARTED", "runnerId": "r1", "region": "r" * 300}),
        ("PUT", "/api/v1/sandboxes/sb-3", {"state": "STARTED", "runnerId": "r1", "organizationId": "a\x00b"}),
        ("PUT", "/api/v1/sandboxes/sb-4", {"state": "STARTED", "runnerId": "r\x00"}),
        ("PUT", "/api/v1/sandboxes/sb-5", {"state": "STARTED", "runnerId": "r" * 5000}),
        ("GET", "/api/v1/sandboxes/a%00b", None),
        ("GET", "/api/v1/backups/a%00b", None),
        ("GET", "/api/v1/backups/" + "x" * 5000, None),
        ("GET", "/api/v1/sandboxes?offset=100000000000000000000", None),
        ("GET", "/api/v1/sandboxes?offset=9223372036854775807", None),
        ("PUT", "/api/v1/runners/rx", {"apiUrl": "http://127.0.0.1:9", "token": "t" * 2000}),
        ("PUT", "/api/v1/runners/ry", {"apiUrl": "http://127.0.0.1:9", "token": "t", "region": "r" * 300}),
        ("PUT", "/api/v1/runners/rz", {"apiUrl": "http://127.0.0.1:9", "token": ""}),
        ("PUT", "/api/v1/registries/g1", {"url": "http://127.0.0.1:9", "project": "Bad Project"}),
        ("PUT", "/api/v1/registries/g2", {"url": "http://127.0.0.1:9", "username": "u" * 300}),
        ("PUT", "/api/v1/registries/g3", {"url": "http://user:secretpw@127.0.0.1:9"}),
        ("PUT", "/api/v1/registries/g4", {"url": "http://127.0.0.1:9", "password": "p\x00"}),
        ("POST", "/api/v1/runners/r%00/reports", {"sandboxId": "x", "snapshot": "y", "state": "COMPLETED"}),
        ("POST", "/api/v1/runners/r1/reports", {"sandboxId": "x\x00", "snapshot": "y", "state": "COMPLETED"}),
        ("POST", "/api/v1/sandboxes/nope/events", {"type": "stopped"}),
        ("POST", "/api/v1/sandboxes/a%00/events", {"type": "stopped"}),
        ("POST", "/api/v1/sandboxes/a%00/backup", None),
        ("PUT", "/api/v1/sandboxes/sb-6", [1, 2]),
        ("PUT", "/api/v1/runners/r1x", {"apiUrl": "http://127.0.0.1:9", "token": "t", "capacity": 10**30}),
    ]
    for method, path, body in cases:
        headers = {"Authorization": "Bearer runner-token"} if "reports" in path else {}
        try:
            r = await api.request(method, path, json=body, headers=headers)
            results[(method, path[:60], str(body)[:80])] = (r.status_code, r.text[:200])
        except Exception as exc:
            results[(method, path[:60], str(body)[:80])] = ("EXC", repr(exc)[:200])
    for k, v in results.items():
        print(k, v)
    assert False
