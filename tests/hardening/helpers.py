"""Shared steps of the hardening tests: claim attempts without a runner, post reports, read rows."""

from __future__ import annotations

import httpx

from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, cleanup, sandboxes
from sandbox_backup.store.models import Backup, CleanupTask, Sandbox

import sqlalchemy as sa

DIGEST = "sha256:" + "a" * 64


async def claim_all(manager: BackupManager) -> list[backups.DispatchCandidate]:
    """Claim what dispatch would claim, without calling runners."""
    ctx = manager.ctx
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(
            session, now=ctx.now(), default_cap=ctx.settings.max_concurrent_backups_per_runner, limit=10_000
        )
    claimed = []
    for candidate in candidates:
        async with ctx.db.transaction() as session:
            if await backups.claim_batch(session, [candidate], now=ctx.now()):
                claimed.append(candidate)
    return claimed


async def post_report(api: httpx.AsyncClient, runner_id: str, body: dict[str, object], token: str = "runner-token") -> httpx.Response:
    return await api.post(f"/api/v1/runners/{runner_id}/reports", json=body, headers={"Authorization": f"Bearer {token}"})


async def history(manager: BackupManager, sandbox_id: str) -> list[Backup]:
    """Attempts of one sandbox, newest first."""
    async with manager.ctx.db.transaction() as session:
        return await backups.list_for_sandbox(session, sandbox_id)


async def get_sandbox(manager: BackupManager, sandbox_id: str) -> Sandbox | None:
    async with manager.ctx.db.transaction() as session:
        return await sandboxes.get_sandbox(session, sandbox_id)


async def open_attempts(manager: BackupManager, sandbox_id: str) -> int:
    async with manager.ctx.db.transaction() as session:
        return await backups.open_attempt_count(session, sandbox_id)


async def cleanup_tasks(manager: BackupManager, sandbox_id: str) -> list[CleanupTask]:
    async with manager.ctx.db.transaction() as session:
        result = await session.execute(sa.select(CleanupTask).where(CleanupTask.sandbox_id == sandbox_id))
        return list(result.scalars())


async def owed_deletions(manager: BackupManager) -> int:
    async with manager.ctx.db.transaction() as session:
        return await cleanup.owed_count(session)
