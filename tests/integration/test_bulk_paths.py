"""Bulk paths on SQLite and PostgreSQL: batch registration, bulk queueing and bulk claims.

Each must keep the fences of the one-at-a-time paths: one attempt in flight per sandbox, the
sandbox version read before a write, and the per-runner cap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import httpx
import sqlalchemy as sa

from sandbox_backup.domain.states import BackupState, BackupTrigger, SandboxBackupState, SandboxState
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import attempt_queue, backups, fleet, sandboxes
from sandbox_backup.store.models import Backup, Sandbox
from tests.fixtures.manager import add_registry, add_runner, add_sandbox


async def _rows(manager: BackupManager, model, **where) -> list:  # type: ignore[no-untyped-def]
    async with manager.ctx.db.transaction() as session:
        statement = sa.select(model).filter_by(**where)
        return list((await session.execute(statement)).scalars())


def _item(sandbox_id: str, state: str = "STARTED", runner_id: str = "r1", **extra: object) -> dict[str, object]:
    return {"id": sandbox_id, "state": state, "runnerId": runner_id, "organizationId": "org-1", **extra}


async def test_batch_records_sandboxes_and_queues_due_backups(manager: BackupManager, api: httpx.AsyncClient, caplog) -> None:  # type: ignore[no-untyped-def]
    # INFO records are built, so a log field that clashes with a LogRecord attribute fails here.
    caplog.set_level(logging.INFO)
    await add_runner(manager, "r1")
    await add_registry(manager)

    batch = [_item("sb-run"), _item("sb-stop", state="STOPPED"), _item("sb-eph", ephemeral=True), _item("sb-pool", organizationId="")]
    response = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": batch})

    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": 4, "created": 4, "backupsQueued": 2}
    assert [r.sandboxes_recorded for r in caplog.records if getattr(r, "action", None) == "sandboxes_upserted"] == [4]
    pending = {b.sandbox_id: b for b in await _rows(manager, Backup, state=BackupState.PENDING)}
    assert set(pending) == {"sb-run", "sb-stop"}
    assert pending["sb-run"].trigger == BackupTrigger.SCHEDULE
    assert pending["sb-stop"].trigger == BackupTrigger.STOPPED
    for sandbox in await _rows(manager, Sandbox):
        expected = SandboxBackupState.PENDING if sandbox.id in pending else SandboxBackupState.NONE
        assert sandbox.backup_state == expected, sandbox.id
        assert sandbox.current_backup_id == (pending[sandbox.id].id if sandbox.id in pending else None)

    # The same batch again changes nothing and queues nothing: both attempts are still in flight.
    again = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": batch})
    assert again.json() == {"recorded": 4, "created": 0, "backupsQueued": 0}
    assert len(await _rows(manager, Backup)) == 2


async def test_batch_is_all_or_nothing(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)

    unknown_runner = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item("sb-1"), _item("sb-2", runner_id="r-missing")]})
    repeated = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item("sb-1"), _item("sb-1")]})
    bad_id = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item("sb-1"), _item("Not A Valid Id")]})
    too_many = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item(f"sb-{i}") for i in range(1001)]})

    assert unknown_runner.status_code == 404
    assert "r-missing" in unknown_runner.json()["error"]["message"]
    assert repeated.status_code == 400
    assert "listed twice" in repeated.json()["error"]["message"]
    assert bad_id.status_code == 400
    assert too_many.status_code == 422
    assert await _rows(manager, Sandbox) == []
    assert await _rows(manager, Backup) == []


async def test_batch_destroy_cancels_and_owes_the_deletion(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item("sb-1"), _item("sb-2")]})

    response = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item("sb-1", state="DESTROYED"), _item("sb-2")]})

    assert response.json() == {"recorded": 2, "created": 0, "backupsQueued": 0}
    states = {b.sandbox_id: b.state for b in await _rows(manager, Backup)}
    assert states == {"sb-1": BackupState.ERROR, "sb-2": BackupState.PENDING}
    detail = (await api.get("/api/v1/sandboxes/sb-1")).json()
    assert detail["state"] == "DESTROYED"
    assert detail["owedDeletions"] == 1


async def test_bulk_queue_skips_in_flight_and_changed_sandboxes(manager: BackupManager) -> None:
    ctx = manager.ctx
    await add_runner(manager, "r1")
    await add_registry(manager)
    for sandbox_id in ("sb-free", "sb-busy", "sb-moved"):
        await add_sandbox(manager, sandbox_id, runner_id="r1")
    async with ctx.db.transaction() as session:
        read = await sandboxes.get_sandboxes(session, ["sb-free", "sb-busy", "sb-moved"])
        registry = await fleet.get_registry(session, "main")
    # sb-busy already has an attempt in flight; sb-moved stops after it was read.
    await manager.check_running_due()
    async with ctx.db.transaction() as session:
        for sandbox_id in ("sb-free", "sb-moved"):
            await backups.cancel_pending(session, sandbox_id, reason="test", now=ctx.now())
        await sandboxes.set_state(session, await sandboxes.get_sandbox(session, "sb-moved"), SandboxState.STOPPED, now=ctx.now())
        read["sb-free"] = await sandboxes.get_sandbox(session, "sb-free")

    requests = [attempt_queue.AttemptRequest(s.id, s.version, s.runner_id, registry, BackupTrigger.SCHEDULE) for s in read.values()]
    async with ctx.db.transaction() as session:
        result = await attempt_queue.create_attempts(session, requests, now=ctx.now())

    assert [q.sandbox_id for q in result.queued] == ["sb-free"]
    open_attempts = {b.sandbox_id: b.id for b in await _rows(manager, Backup) if b.state in (BackupState.PENDING, BackupState.IN_PROGRESS)}
    # The attempt taken back for sb-moved is gone; sb-busy keeps the attempt it had.
    assert set(open_attempts) == {"sb-free", "sb-busy"}
    assert open_attempts["sb-free"] == result.queued[0].backup_id
    current = {s.id: s.current_backup_id for s in await _rows(manager, Sandbox)}
    assert current["sb-free"] == result.queued[0].backup_id
    assert current["sb-busy"] == open_attempts["sb-busy"]


async def test_bulk_claim_keeps_the_runner_cap(manager: BackupManager) -> None:
    ctx = manager.ctx
    await add_runner(manager, "r1", max_concurrent_backups=3)
    await add_runner(manager, "r2", max_concurrent_backups=1)
    await add_registry(manager)
    for i in range(5):
        await add_sandbox(manager, f"sb-a{i}", runner_id="r1")
        await add_sandbox(manager, f"sb-b{i}", runner_id="r2")
    assert await manager.check_running_due() == 10

    # Candidates as a reader that saw no attempt in flight would pick them: every PENDING attempt.
    caps = {"r1": 3, "r2": 1}
    runner_of = {s.id: s.runner_id for s in await _rows(manager, Sandbox)}
    stale = [
        backups.DispatchCandidate(b.id, b.version, b.sandbox_id, runner_of[b.sandbox_id], cap=caps[runner_of[b.sandbox_id]])
        for b in sorted(await _rows(manager, Backup), key=lambda b: b.sandbox_id)
    ]
    async with ctx.db.transaction() as session:
        first = await backups.claim_batch(session, stale, now=ctx.now())
    async with ctx.db.transaction() as session:
        second = await backups.claim_batch(session, stale, now=ctx.now())

    assert sorted(backup.runner_id for backup, _, _ in first) == ["r1", "r1", "r1", "r2"]
    assert second == []
    claimed = {backup.id for backup, _, _ in first}
    for sandbox in await _rows(manager, Sandbox):
        expected = SandboxBackupState.IN_PROGRESS if sandbox.current_backup_id in claimed else SandboxBackupState.PENDING
        assert sandbox.backup_state == expected, sandbox.id


async def test_reports_arriving_together_share_transactions(manager: BackupManager, api: httpx.AsyncClient) -> None:
    ctx = manager.ctx
    await add_runner(manager, "r1", max_concurrent_backups=30)
    await add_registry(manager)
    for i in range(21):
        await add_sandbox(manager, f"sb-{i:02d}", runner_id="r1")
    await manager.check_running_due()
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=ctx.now(), default_cap=30, limit=100)
        claimed = {backup.sandbox_id: backup for backup, _, _ in await backups.claim_batch(session, candidates, now=ctx.now())}
    assert len(claimed) == 21

    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    def report(sandbox_id: str, token: str = "runner-token") -> Awaitable[httpx.Response]:
        body = {"sandboxId": sandbox_id, "snapshot": claimed[sandbox_id].image_ref, "state": "COMPLETED", "digest": "sha256:" + "b" * 64, "sizeBytes": 7}
        return api.post("/api/v1/runners/r1/reports", json=body, headers={"Authorization": f"Bearer {token}"})

    sa.event.listen(ctx.db.engine.sync_engine, "before_cursor_execute", count)
    try:
        # sb-20's report carries a wrong token: it is refused, and the rest of its group is written.
        responses = await asyncio.gather(*(report(f"sb-{i:02d}") for i in range(20)), report("sb-20", token="wrong-token"))
    finally:
        sa.event.remove(ctx.db.engine.sync_engine, "before_cursor_execute", count)

    assert [r.status_code for r in responses] == [202] * 20 + [401]
    states = {b.sandbox_id: b.state for b in await _rows(manager, Backup)}
    assert states == {**{f"sb-{i:02d}": BackupState.COMPLETED for i in range(20)}, "sb-20": BackupState.IN_PROGRESS}
    for sandbox in await _rows(manager, Sandbox):
        expected = SandboxBackupState.IN_PROGRESS if sandbox.id == "sb-20" else SandboxBackupState.COMPLETED
        assert sandbox.backup_state == expected, sandbox.id
        if sandbox.id != "sb-20":
            assert sandbox.last_backup_started_at == claimed[sandbox.id].started_at
    completing = [s for s in statements if s.lstrip().upper().startswith("UPDATE BACKUPS")]
    assert 1 <= len(completing) < 20


async def _candidates(manager: BackupManager) -> dict[str, str]:
    """Dispatch candidates as {sandbox id: runner id}."""
    async with manager.ctx.db.transaction() as session:
        found = await backups.dispatch_candidates(session, now=manager.ctx.now(), default_cap=6, limit=100)
    return {candidate.sandbox_id: candidate.runner_id for candidate in found}


async def test_pending_attempt_follows_moved_sandbox(manager: BackupManager, api: httpx.AsyncClient) -> None:
    ctx = manager.ctx
    for runner_id in ("r1", "r2", "r3"):
        await add_runner(manager, runner_id)
    await add_registry(manager)
    await add_sandbox(manager, "sb-put", runner_id="r1")
    await add_sandbox(manager, "sb-batch", runner_id="r1")
    await add_sandbox(manager, "sb-moved", runner_id="r1", state=SandboxState.STOPPED)
    assert await manager.check_running_due() == 2
    assert await manager.check_stopped_due() == 1
    assert await _candidates(manager) == {"sb-put": "r1", "sb-batch": "r1", "sb-moved": "r1"}

    # The platform reports two sandboxes on r2, one by PUT and one in a batch. A drain moves the third to r3.
    put = await api.put("/api/v1/sandboxes/sb-put", json={"state": "STARTED", "runnerId": "r2", "organizationId": "org-1"})
    batch = await api.post("/api/v1/sandboxes/batch", json={"sandboxes": [_item("sb-batch", runner_id="r2")]})
    async with ctx.db.transaction() as session:
        moved = await sandboxes.move_to_runner(session, "sb-moved", runner_id="r3", started=False, now=ctx.now(), expected_state=SandboxState.STOPPED)

    assert put.status_code == 200, put.text
    assert batch.status_code == 200, batch.text
    assert moved
    assert await _candidates(manager) == {"sb-put": "r2", "sb-batch": "r2", "sb-moved": "r3"}
    assert {b.sandbox_id: b.runner_id for b in await _rows(manager, Backup, state=BackupState.PENDING)} == {"sb-put": "r2", "sb-batch": "r2", "sb-moved": "r3"}


async def test_dispatch_skips_mismatched_runner(manager: BackupManager) -> None:
    # A write that moved the sandbox without its PENDING attempt leaves the two disagreeing.
    # Dispatch then sends the attempt to neither runner.
    ctx = manager.ctx
    await add_runner(manager, "r1")
    await add_runner(manager, "r2")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await add_sandbox(manager, "sb-2", runner_id="r1")
    await manager.check_running_due()
    async with ctx.db.transaction() as session:
        await session.execute(sa.update(Sandbox).where(Sandbox.id == "sb-1").values(runner_id="r2"))

    assert await _candidates(manager) == {"sb-2": "r1"}


async def test_archived_sandbox_clears_pending_runner(manager: BackupManager) -> None:
    ctx = manager.ctx
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.ARCHIVING)
    await manager.check_stopped_due()
    async with ctx.db.transaction() as session:
        archived = await sandboxes.finish_archive(session, await sandboxes.get_sandbox(session, "sb-1"), now=ctx.now())

    assert archived
    assert [b.runner_id for b in await _rows(manager, Backup, state=BackupState.PENDING)] == [None]
    assert await _candidates(manager) == {}
