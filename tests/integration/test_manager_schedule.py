"""Scheduling, dispatch, reports and retries of the manager on SQLite and PostgreSQL.

The runner side here is either an address where nothing listens (a real connection refusal) or a
runner report posted to the manager's real API; the end-to-end tests drive real runner agents.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import sqlalchemy as sa

from sandbox_backup.domain.states import BackupState, RunnerState, SandboxBackupState, SandboxState
from sandbox_backup.manager import lifecycle
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, fleet, sandboxes
from sandbox_backup.store.models import Backup
from tests.fixtures.manager import add_registry, add_runner, add_sandbox

HOUR = 3600.0


async def _backups(manager: BackupManager, sandbox_id: str) -> list[Backup]:
    async with manager.ctx.db.transaction() as session:
        return await backups.list_for_sandbox(session, sandbox_id)


async def _sandbox(manager: BackupManager, sandbox_id: str):  # type: ignore[no-untyped-def]
    async with manager.ctx.db.transaction() as session:
        return await sandboxes.get_sandbox(session, sandbox_id)


async def _claim_all(manager: BackupManager) -> list[backups.DispatchCandidate]:
    """Claim what dispatch would claim, without calling runners."""
    ctx = manager.ctx
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=ctx.now(), default_cap=ctx.settings.max_concurrent_backups_per_runner, limit=10_000)
    claimed = []
    for candidate in candidates:
        async with ctx.db.transaction() as session:
            if await backups.claim_batch(session, [candidate], now=ctx.now()):
                claimed.append(candidate)
    return claimed


async def _report(api: httpx.AsyncClient, runner_id: str, body: dict[str, object], token: str = "runner-token") -> httpx.Response:
    return await api.post(f"/api/v1/runners/{runner_id}/reports", json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
async def one_sandbox(manager: BackupManager) -> BackupManager:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    return manager


async def _complete_current(manager: BackupManager, api: httpx.AsyncClient, sandbox_id: str = "sb-1") -> Backup:
    claimed = await _claim_all(manager)
    assert [c.sandbox_id for c in claimed] == [sandbox_id]
    attempt = (await _backups(manager, sandbox_id))[0]
    response = await _report(api, "r1", {"sandboxId": sandbox_id, "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": "sha256:" + "a" * 64, "sizeBytes": 123})
    assert response.status_code == 202
    assert response.json() == {"accepted": True}
    return attempt


async def test_completed_backup_older_than_interval_is_due_again(one_sandbox: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    manager = one_sandbox
    assert await manager.check_running_due() == 1
    await _complete_current(manager, api)
    assert (await _sandbox(manager, "sb-1")).backup_state == SandboxBackupState.COMPLETED

    clock.advance(HOUR - 60)
    assert await manager.check_running_due() == 0

    clock.advance(120)
    assert await manager.check_running_due() == 1
    history = await _backups(manager, "sb-1")
    assert [b.state for b in history] == [BackupState.PENDING, BackupState.COMPLETED]


async def test_due_check_skips_sandboxes_never_backed_up(manager: BackupManager) -> None:
    await add_runner(manager, "r1")
    await add_runner(manager, "r-down", state=RunnerState.UNRESPONSIVE)
    await add_registry(manager)
    await add_sandbox(manager, "ephemeral", runner_id="r1", ephemeral=True)
    await add_sandbox(manager, "warm-pool", runner_id="r1", organization_id=None)
    await add_sandbox(manager, "on-down-runner", runner_id="r-down")
    await add_sandbox(manager, "kept", runner_id="r1")
    await lifecycle.upsert_sandbox(manager.ctx, "doomed", sandboxes.SandboxFields(state=SandboxState.STARTED, runner_id="r1", organization_id="o", desired_state=SandboxState.DESTROYED))

    assert await manager.check_running_due() == 1
    assert [b.sandbox_id for b in await _claim_all(manager)] == ["kept"]


async def test_stopped_sandbox_backed_up_once_after_stop(one_sandbox: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    manager = one_sandbox
    assert await manager.check_running_due() == 1
    await _complete_current(manager, api)

    clock.advance(60)
    response = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "stopped"})
    assert response.status_code == 200
    assert response.json()["backupState"] == "PENDING"  # queued by the event, not by a tick

    clock.advance(1)  # dispatched after the stop, as on a real clock
    await _complete_current(manager, api)
    clock.advance(10 * HOUR)
    assert await manager.check_stopped_due() == 0
    assert await manager.check_running_due() == 0


async def test_late_accept_never_overwrites_completed(one_sandbox: BackupManager, api: httpx.AsyncClient) -> None:
    manager = one_sandbox
    await manager.check_running_due()
    attempt = await _complete_current(manager, api)

    async with manager.ctx.db.transaction() as session:
        assert await backups.mark_accepted(session, [attempt.id], now=manager.ctx.now()) == set()
    history = await _backups(manager, "sb-1")
    assert history[0].state == BackupState.COMPLETED
    assert history[0].accepted_at is None


async def test_report_for_earlier_reference_is_ignored(one_sandbox: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    manager = one_sandbox
    await manager.check_running_due()
    first = await _complete_current(manager, api)
    clock.advance(2 * HOUR)
    await manager.check_running_due()
    await _claim_all(manager)

    stale = {"sandboxId": "sb-1", "snapshot": first.image_ref, "state": "FAILED", "error": "late failure of an old attempt"}
    response = await _report(api, "r1", stale)
    assert response.json() == {"accepted": False}

    current, previous = await _backups(manager, "sb-1")
    assert current.state == BackupState.IN_PROGRESS
    assert previous.state == BackupState.COMPLETED
    assert previous.error_reason is None


async def test_report_with_wrong_token_is_rejected(one_sandbox: BackupManager, api: httpx.AsyncClient) -> None:
    manager = one_sandbox
    await manager.check_running_due()
    await _claim_all(manager)
    attempt = (await _backups(manager, "sb-1"))[0]

    report = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED"}
    response = await _report(api, "r1", report, token="wrong")
    # With a digest the completion is written before the token is checked, and must be rolled back.
    with_digest = await _report(api, "r1", {**report, "digest": "sha256:" + "a" * 64}, token="wrong")

    assert response.status_code == 401
    assert "runner-token" not in response.text
    assert with_digest.status_code == 401
    assert (await _backups(manager, "sb-1"))[0].state == BackupState.IN_PROGRESS
    assert (await _sandbox(manager, "sb-1")).backup_state == SandboxBackupState.IN_PROGRESS


async def test_retries_back_off_then_end_in_error(one_sandbox: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    manager = one_sandbox  # runner r1 points at a port where nothing listens
    assert manager.ctx.settings.retry_max_attempts == 5
    await manager.check_running_due()

    delays = []
    for attempt_number in range(1, 6):
        assert await manager.dispatch_pending() == 1
        history = await _backups(manager, "sb-1")
        failed = history[1] if attempt_number < 5 else history[0]
        assert failed.attempt == attempt_number
        assert failed.state == BackupState.ERROR
        assert "could not start the backup on runner r1" in failed.error_reason
        if attempt_number < 5:
            retry = history[0]
            assert retry.state == BackupState.PENDING
            delays.append((retry.next_attempt_at - clock.now()).total_seconds())
            assert await manager.dispatch_pending() == 0  # not before its back-off
            clock.set(retry.next_attempt_at)

    assert delays == [30.0, 60.0, 120.0, 240.0]
    sandbox = await _sandbox(manager, "sb-1")
    assert sandbox.backup_state == SandboxBackupState.ERROR
    assert len(await _backups(manager, "sb-1")) == 5
    assert await manager.dispatch_pending() == 0


async def test_dispatch_respects_runner_cap_and_is_fair(manager: BackupManager) -> None:
    await add_registry(manager)
    await add_runner(manager, "busy")
    await add_runner(manager, "small", max_concurrent_backups=2)
    await add_runner(manager, "quiet")
    for index in range(10):
        await add_sandbox(manager, f"busy-{index}", runner_id="busy")
    for index in range(3):
        await add_sandbox(manager, f"small-{index}", runner_id="small")
    await add_sandbox(manager, "quiet-0", runner_id="quiet")
    await manager.check_running_due()

    async with manager.ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=manager.ctx.now(), default_cap=6, limit=3)
    assert sorted(c.runner_id for c in candidates) == ["busy", "quiet", "small"]  # one each before any second

    claimed = await _claim_all(manager)
    per_runner = {runner: sum(1 for c in claimed if c.runner_id == runner) for runner in ("busy", "small", "quiet")}
    assert per_runner == {"busy": 6, "small": 2, "quiet": 1}
    assert await _claim_all(manager) == []


async def test_dispatch_orders_archiving_then_stopped_then_started(manager: BackupManager) -> None:
    await add_registry(manager)
    await add_runner(manager, "r1")
    await add_sandbox(manager, "running", runner_id="r1")
    await add_sandbox(manager, "stopped", runner_id="r1", state=SandboxState.STOPPED)
    await add_sandbox(manager, "archiving", runner_id="r1", state=SandboxState.ARCHIVING)
    await manager.check_running_due()
    await manager.check_stopped_due()

    async with manager.ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=manager.ctx.now(), default_cap=3, limit=10)
    assert [c.sandbox_id for c in candidates] == ["archiving", "stopped", "running"]


async def test_sandbox_id_that_cannot_form_reference_is_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    response = await api.put("/api/v1/sandboxes/Bad_ID", json={"state": "STARTED", "runnerId": "r1", "organizationId": "o"})
    assert response.status_code == 400
    assert "cannot form an image reference" in response.json()["error"]["message"]
    assert (await api.get("/api/v1/sandboxes/Bad_ID")).status_code == 404


async def test_unknown_runner_is_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    response = await api.put("/api/v1/sandboxes/sb-1", json={"state": "STARTED", "runnerId": "nope", "organizationId": "o"})
    assert response.status_code == 404
    assert "runner 'nope' is not registered" in response.json()["error"]["message"]
    assert (await api.get("/api/v1/sandboxes/sb-1")).status_code == 404


async def test_api_requires_token(manager: BackupManager, api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/runners", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "Unauthorized"


async def test_destroy_cancels_pending_and_owes_cleanup(one_sandbox: BackupManager, api: httpx.AsyncClient) -> None:
    manager = one_sandbox
    await manager.check_running_due()
    response = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "destroyed"})
    assert response.status_code == 200
    assert response.json()["state"] == "DESTROYED"

    history = await _backups(manager, "sb-1")
    assert history[0].state == BackupState.ERROR
    assert "destroyed" in history[0].error_reason
    async with manager.ctx.db.transaction() as session:
        count = (await session.execute(sa.text("SELECT count(*) FROM cleanup_tasks WHERE done_at IS NULL"))).scalar_one()
    assert count == 1
    assert await manager.check_running_due() == 0


async def test_request_backup_returns_attempt_in_flight(one_sandbox: BackupManager, api: httpx.AsyncClient) -> None:
    first = await api.post("/api/v1/sandboxes/sb-1/backup")
    second = await api.post("/api/v1/sandboxes/sb-1/backup")
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert len(await _backups(one_sandbox, "sb-1")) == 1


async def test_request_backup_of_ephemeral_sandbox_is_rejected(manager: BackupManager, api: httpx.AsyncClient) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "eph", runner_id="r1", ephemeral=True)
    response = await api.post("/api/v1/sandboxes/eph/backup")
    assert response.status_code == 409
    assert "ephemeral" in response.json()["error"]["message"]
    assert await _backups(manager, "eph") == []


async def test_attempt_past_deadline_is_failed_and_retried(one_sandbox: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    manager = one_sandbox
    await manager.check_running_due()
    await _claim_all(manager)

    clock.advance(manager.ctx.settings.attempt_deadline_s + 1)
    assert await manager.sync_progress() == 1
    retry, timed_out = await _backups(manager, "sb-1")
    assert timed_out.state == BackupState.ERROR
    assert "timed out" in timed_out.error_reason
    assert retry.state == BackupState.PENDING
    assert retry.attempt == 2
    assert retry.image_ref != timed_out.image_ref



async def test_due_check_queues_past_full_batches(manager: BackupManager) -> None:
    manager.ctx.settings = manager.ctx.settings.model_copy(update={"due_check_batch": 3})
    await add_runner(manager, "r1")
    await add_registry(manager)
    for index in range(8):
        await add_sandbox(manager, f"sb-{index}", runner_id="r1")

    # Eight due sandboxes with batches of three: one pass queues them all.
    assert await manager.check_running_due() == 8


async def test_errored_sandboxes_do_not_starve_due_check(manager: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    manager.ctx.settings = manager.ctx.settings.model_copy(update={"due_check_batch": 2, "retry_max_attempts": 1})
    await add_runner(manager, "r1")  # nothing listens there: every dispatch fails
    await add_registry(manager)
    for index in range(3):
        await add_sandbox(manager, f"a-{index}", runner_id="r1")
    assert await manager.check_running_due() == 3
    assert await manager.dispatch_pending() == 3  # all three end in ERROR, no retry left

    clock.advance(60)
    await add_sandbox(manager, "late", runner_id="r1")

    # The errored sandboxes sort first (never backed up) but wait out the interval in the query
    # itself, so they cannot fill every batch and hide the sandbox behind them.
    assert await manager.check_running_due() == 1
    assert (await _sandbox(manager, "late")).backup_state == SandboxBackupState.PENDING


async def test_progress_polls_only_quiet_attempts(manager_factory, clock) -> None:  # type: ignore[no-untyped-def]
    manager = await manager_factory(progress_check_after_s=120.0)
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await manager.check_running_due()
    (claimed,) = await _claim_all(manager)
    dispatched_at = clock.now()

    # Heard of 60 s ago (the dispatch): the runner is not asked.
    clock.advance(60)
    await manager.sync_progress()
    assert (await _backups(manager, "sb-1"))[0].checked_at == dispatched_at

    # Quiet for longer than progress_check_after_s: the runner is asked (it does not answer here).
    clock.advance(61)
    await manager.sync_progress()
    assert (await _backups(manager, "sb-1"))[0].checked_at == clock.now()


async def test_probe_writes_only_what_changed(manager: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    ctx = manager.ctx
    # A stub that answers the health check as a healthy runner agent does.
    server = await asyncio.start_server(_answer_health, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await add_runner(manager, "r1", api_url=f"http://127.0.0.1:{port}")
        await manager.probe_runners()
        first = await _runner(manager, "r1")

        # Seen 30 s ago: the answered probe writes nothing.
        clock.advance(30)
        await manager.probe_runners()
        unchanged = await _runner(manager, "r1")

        clock.advance(31)
        await manager.probe_runners()
        refreshed = await _runner(manager, "r1")
    finally:
        server.close()
        await server.wait_closed()

    assert first.last_seen_at is not None
    assert unchanged.version == first.version
    assert refreshed.version == first.version + 1
    assert refreshed.last_seen_at == clock.now()
    assert ctx.settings.runner_health_interval_s < 60


async def _runner(manager: BackupManager, runner_id: str):  # type: ignore[no-untyped-def]
    async with manager.ctx.db.transaction() as session:
        return await fleet.get_runner(session, runner_id)


async def _answer_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = b'{"status":"ok","engineReachable":true}'
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


class _CountingAgent:
    """A loopback stub of a healthy runner agent that accepts every backup and counts requests by path."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None
        self.connections: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        # Closing the server leaves open connections served, and the manager keeps them alive.
        for writer in self.connections:
            writer.close()
        await self.server.wait_closed()

    def count(self, path_part: str) -> int:
        return sum(1 for path in self.requests if path_part in path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests.append(path)
                status, body = (b"200 OK", b'{"status":"ok","engineReachable":true}') if path.endswith("/health") else (b"201 Created", b'"Backup started"')
                writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _start_busy_runner(manager: BackupManager, agent: _CountingAgent) -> None:
    """Register runner r1 on `agent` and a registry, probe once, and dispatch one backup to r1."""
    await add_runner(manager, "r1", api_url=await agent.start())
    await add_registry(manager)
    await manager.probe_runners()
    assert await _dispatch_new_sandbox(manager, "sb-1") == 1


async def _dispatch_new_sandbox(manager: BackupManager, sandbox_id: str) -> int:
    """Register a running sandbox on r1, queue its backup and run one dispatch pass; return how many were sent."""
    await add_sandbox(manager, sandbox_id, runner_id="r1")
    await manager.check_running_due()
    return await manager.dispatch_pending()


async def test_probe_skips_runner_that_accepted_backup(manager: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    agent = _CountingAgent()
    try:
        await _start_busy_runner(manager, agent)

        # Accepting the backup needed the agent and its engine: no probe within one interval.
        clock.advance(5)
        await manager.probe_runners()
        probes_within_interval = agent.count("/health")

        clock.advance(manager.ctx.settings.runner_health_interval_s)
        await manager.probe_runners()
        probes_after_interval = agent.count("/health")
    finally:
        await agent.stop()

    assert agent.count("/backup") == 1
    assert probes_within_interval == 1
    assert probes_after_interval == 2


async def test_busy_runner_seen_without_probes(manager: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    agent = _CountingAgent()
    try:
        await _start_busy_runner(manager, agent)

        # A minute later the runner accepts another backup. That refreshes last_seen_at, so the
        # probe pass right after it still has nothing to ask.
        clock.advance(61)
        assert await _dispatch_new_sandbox(manager, "sb-2") == 1
        seen = (await _runner(manager, "r1")).last_seen_at
        await manager.probe_runners()
    finally:
        await agent.stop()

    assert seen == clock.now()
    assert agent.count("/health") == 1


async def test_failed_dispatch_keeps_runner_probed(manager: BackupManager, clock) -> None:  # type: ignore[no-untyped-def]
    agent = _CountingAgent()
    await _start_busy_runner(manager, agent)
    await agent.stop()

    # The agent is gone: the next dispatch fails, and the probe right after it runs and counts a failure.
    clock.advance(1)
    assert await _dispatch_new_sandbox(manager, "sb-2") == 1
    await manager.probe_runners()

    assert (await _runner(manager, "r1")).failed_probes == 1


async def test_probe_pass_covers_many_runners(manager_factory) -> None:  # type: ignore[no-untyped-def]
    # More runners than probe workers (runner_call_concurrency // 2): every runner is still probed once.
    manager = await manager_factory(runner_call_concurrency=4)
    agent = _CountingAgent()
    try:
        url = await agent.start()
        for index in range(9):
            await add_runner(manager, f"r{index}", api_url=url)
        await manager.probe_runners()
    finally:
        await agent.stop()

    assert agent.count("/health") == 9
    for index in range(9):
        assert (await _runner(manager, f"r{index}")).last_seen_at is not None
