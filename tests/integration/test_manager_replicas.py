"""Several manager replicas on one PostgreSQL and one Redis, and runners that answer badly."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa

from sandbox_backup.coordination.factory import create_coordinator
from sandbox_backup.domain.states import BackupState
from sandbox_backup.store import backups
from tests.fixtures.manager import add_registry, add_runner, add_sandbox

RUNNERS = 8
SANDBOXES_PER_RUNNER = 12


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_managers_never_dispatch_one_attempt_twice(manager_factory, redis_url, redis_key_prefix) -> None:  # type: ignore[no-untyped-def]
    first = await manager_factory(coordinator=create_coordinator(redis_url, key_prefix=redis_key_prefix), coordination_url=redis_url)
    second = await manager_factory(coordinator=create_coordinator(redis_url, key_prefix=redis_key_prefix), coordination_url=redis_url)
    await add_registry(first)
    for runner_index in range(RUNNERS):
        # Nothing listens on port 9: every dispatch ends in a real connection refusal.
        await add_runner(first, f"r{runner_index}", max_concurrent_backups=SANDBOXES_PER_RUNNER)
        for sandbox_index in range(SANDBOXES_PER_RUNNER):
            await add_sandbox(first, f"sb-{runner_index}-{sandbox_index}", runner_id=f"r{runner_index}")
    assert await first.check_running_due() == RUNNERS * SANDBOXES_PER_RUNNER

    # Both replicas run the dispatch body at once, bypassing the job lock, so only the
    # guarded claim keeps an attempt from going out twice.
    sent = await asyncio.gather(*(m.dispatch_pending() for m in (first, second, first, second)))

    assert sum(sent) == RUNNERS * SANDBOXES_PER_RUNNER
    async with first.ctx.db.transaction() as session:
        rows = (await session.execute(sa.text("SELECT attempt, state, count(*) FROM backups GROUP BY attempt, state"))).all()
    by_key = {(attempt, state): count for attempt, state, count in rows}
    assert by_key == {(1, "ERROR"): RUNNERS * SANDBOXES_PER_RUNNER, (2, "PENDING"): RUNNERS * SANDBOXES_PER_RUNNER}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_periodic_job_runs_on_one_replica_at_a_time(manager_factory, redis_url, redis_key_prefix) -> None:  # type: ignore[no-untyped-def]
    first = await manager_factory(coordinator=create_coordinator(redis_url, key_prefix=redis_key_prefix))
    second = await manager_factory(coordinator=create_coordinator(redis_url, key_prefix=redis_key_prefix))
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow_body() -> int:
        started.set()
        await release.wait()
        return 1

    first_job = next(job for job in first.jobs if job.name == "dispatch")
    second_job = next(job for job in second.jobs if job.name == "dispatch")
    first_job.body = second_job.body = slow_body
    running = asyncio.create_task(first_job.run_once())
    await started.wait()

    assert await second_job.run_once() is None
    release.set()
    assert await running == 1


class _MalformedRunner(BaseHTTPRequestHandler):
    """Answers every call with a body the runner API does not allow.

    A fake: the real agent cannot be made to send a malformed body.
    """

    def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
        payload = json.dumps({"state": "started", "backupState": "HALF_DONE"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def malformed_runner_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MalformedRunner)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_malformed_runner_answer_changes_nothing(manager, malformed_runner_url, caplog) -> None:  # type: ignore[no-untyped-def]
    await add_registry(manager)
    await add_runner(manager, "r1", api_url=malformed_runner_url)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await manager.check_running_due()
    async with manager.ctx.db.transaction() as session:
        candidate = (await backups.dispatch_candidates(session, now=manager.ctx.now(), default_cap=6, limit=10))[0]
        assert await backups.claim_batch(session, [candidate], now=manager.ctx.now())

    assert await manager.sync_progress() == 0

    async with manager.ctx.db.transaction() as session:
        attempt = (await backups.list_for_sandbox(session, "sb-1"))[0]
    assert attempt.state == BackupState.IN_PROGRESS
    assert attempt.error_reason is None
    bad_answers = [r for r in caplog.records if getattr(r, "action", None) == "progress_bad_answer"]
    assert len(bad_answers) == 1
    assert "r1" == bad_answers[0].runner_id

