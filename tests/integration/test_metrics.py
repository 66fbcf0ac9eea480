"""GET /metrics of the manager on SQLite and PostgreSQL, and of the runner agent.

Attempts, verifications and restores are driven as in test_manager_schedule.py: runners and
registries are addresses where nothing listens, and completions are runner reports posted to the
manager's real API.
"""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from sandbox_backup.coordination import keys
from sandbox_backup.domain.states import RunnerState
from sandbox_backup.manager import verification
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.runner.app import create_app as create_runner_app
from sandbox_backup.runner.settings import RunnerSettings
from sandbox_backup.store import backups
from sandbox_backup.store.models import Backup
from tests.fixtures.manager import add_registry, add_runner, add_sandbox

HOUR = 3600.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    """Index samples by name and labels. Bucket bounds become str(float), as "4.194304e+06" is written "4194304.0"."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {key: str(float(value)) if key == "le" else value for key, value in sample.labels.items()}
            samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def _scrape(api: httpx.AsyncClient) -> Samples:
    # No Authorization header: /metrics is open like /health.
    response = await api.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return _parse(response.text)


async def _claim_all(manager: BackupManager) -> None:
    ctx = manager.ctx
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=ctx.now(), default_cap=10, limit=100)
    for candidate in candidates:
        async with ctx.db.transaction() as session:
            assert await backups.claim_batch(session, [candidate], now=ctx.now())


@pytest.fixture
async def seeded(manager: BackupManager) -> BackupManager:
    await add_runner(manager, "r1")
    await add_runner(manager, "r-down", state=RunnerState.UNRESPONSIVE)
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    return manager


async def test_metrics_before_any_backup(seeded: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    clock.advance(2 * HOUR)
    samples = await _scrape(api)

    assert _value(samples, "sandbox_backup_database_up") == 1
    for outcome in ("completed", "failed_transient", "failed_permanent", "timed_out", "lost"):
        assert _value(samples, "sandbox_backup_attempts_total", outcome=outcome) == 0
    assert _value(samples, "sandbox_backup_runner_state", runner="r1", state="READY") == 1
    assert _value(samples, "sandbox_backup_runner_state", runner="r1", state="UNRESPONSIVE") == 0
    assert _value(samples, "sandbox_backup_runner_state", runner="r-down", state="UNRESPONSIVE") == 1
    assert _value(samples, "sandbox_backup_sandboxes_never_backed_up") == 1
    # Never backed up: the age counts from when the sandbox was recorded.
    assert _value(samples, "sandbox_backup_newest_backup_age_max_seconds") == 2 * HOUR
    assert _value(samples, "sandbox_backup_newest_backup_age_seconds_bucket", le="3600.0") == 0
    assert _value(samples, "sandbox_backup_newest_backup_age_seconds_bucket", le="7200.0") == 1
    assert _value(samples, "sandbox_backup_newest_backup_age_seconds_count") == 1
    assert _value(samples, "sandbox_backup_deletions_owed") == 0


async def test_metrics_after_completed_backup(seeded: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    manager = seeded
    assert await manager.check_running_due() == 1
    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_attempts_pending", runner="r1") == 1

    await _claim_all(manager)
    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_attempts_in_progress", runner="r1") == 1
    assert _value(samples, "sandbox_backup_attempts_pending", runner="r1") is None

    clock.advance(90)
    attempt = (await _list(manager, "sb-1"))[0]
    body = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": "sha256:" + "a" * 64, "sizeBytes": 5 * 2**20}
    response = await api.post("/api/v1/runners/r1/reports", json=body, headers={"Authorization": "Bearer runner-token"})
    assert response.json() == {"accepted": True}

    clock.advance(600)
    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_attempts_total", outcome="completed") == 1
    assert _value(samples, "sandbox_backup_attempt_duration_seconds_count", outcome="completed") == 1
    assert _value(samples, "sandbox_backup_attempt_duration_seconds_sum", outcome="completed") == 90
    assert _value(samples, "sandbox_backup_attempt_duration_seconds_bucket", outcome="completed", le="60.0") == 0
    assert _value(samples, "sandbox_backup_attempt_duration_seconds_bucket", outcome="completed", le="120.0") == 1
    assert _value(samples, "sandbox_backup_backup_size_bytes_sum") == 5 * 2**20
    assert _value(samples, "sandbox_backup_backup_size_bytes_bucket", le=str(float(4 * 2**20))) == 0
    assert _value(samples, "sandbox_backup_backup_size_bytes_bucket", le=str(float(16 * 2**20))) == 1
    assert _value(samples, "sandbox_backup_attempts_in_progress", runner="r1") is None
    assert _value(samples, "sandbox_backup_sandboxes_never_backed_up") == 0
    assert _value(samples, "sandbox_backup_newest_backup_age_max_seconds") == 600
    assert _value(samples, "sandbox_backup_newest_backup_age_seconds_bucket", le="900.0") == 1


async def test_metrics_count_failures_by_class(seeded: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    manager = seeded
    await manager.check_running_due()

    # r1's address refuses connections, so dispatch fails the attempt as transient.
    assert await manager.dispatch_pending() == 1
    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_attempts_started_total") == 1
    assert _value(samples, "sandbox_backup_attempts_total", outcome="failed_transient") == 1
    assert _value(samples, "sandbox_backup_attempt_duration_seconds_count", outcome="failed_transient") == 1

    retry = (await _list(manager, "sb-1"))[0]
    clock.set(retry.next_attempt_at)
    await _claim_all(manager)
    clock.advance(manager.ctx.settings.attempt_deadline_s + 1)
    assert await manager.sync_progress() == 1

    third = (await _list(manager, "sb-1"))[0]
    clock.set(third.next_attempt_at)
    await _claim_all(manager)
    body = {"sandboxId": "sb-1", "snapshot": third.image_ref, "state": "FAILED", "error": "credentials rejected", "recoverable": False}
    response = await api.post("/api/v1/runners/r1/reports", json=body, headers={"Authorization": "Bearer runner-token"})
    assert response.json() == {"accepted": True}

    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_attempts_total", outcome="timed_out") == 1
    assert _value(samples, "sandbox_backup_attempts_total", outcome="failed_permanent") == 1
    assert _value(samples, "sandbox_backup_attempts_total", outcome="completed") == 0
    assert _value(samples, "sandbox_backup_attempt_duration_seconds_sum", outcome="timed_out") == manager.ctx.settings.attempt_deadline_s + 1


async def test_metrics_runner_lost_attempt(seeded: BackupManager, api: httpx.AsyncClient) -> None:
    manager = seeded
    await manager.check_running_due()
    await _claim_all(manager)
    # An attempt on a runner that is no longer registered is lost.
    async with manager.ctx.db.transaction() as session:
        await session.execute(sa.update(Backup).values(runner_id="gone"))
    assert await manager.sync_progress() == 1

    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_attempts_total", outcome="lost") == 1


async def test_metrics_verifications_and_registry_up(seeded: BackupManager, api: httpx.AsyncClient) -> None:
    manager = seeded
    await manager.check_running_due()
    await _claim_all(manager)
    attempt = (await _list(manager, "sb-1"))[0]
    body = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": "sha256:" + "b" * 64, "sizeBytes": 10}
    await api.post("/api/v1/runners/r1/reports", json=body, headers={"Authorization": "Bearer runner-token"})

    # The registry's address refuses connections, so it cannot tell.
    assert await verification.verify_backup(manager.ctx, attempt.id) == verification.VerifyOutcome.UNKNOWN
    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_verifications_total", outcome="unknown") == 1
    assert _value(samples, "sandbox_backup_verifications_total", outcome="verified") == 0
    assert _value(samples, "sandbox_backup_registry_up", registry="main") == 0


async def test_metrics_failed_restore(seeded: BackupManager, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    manager = seeded
    response = await api.post("/api/v1/sandboxes/sb-1/restore", json={})
    assert response.status_code in (200, 201, 202)

    clock.advance(12)
    await manager.run_restores()
    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_restores_total", purpose="RESTORE", outcome="failed") == 1
    assert _value(samples, "sandbox_backup_restores_total", purpose="RESTORE", outcome="completed") == 0
    assert _value(samples, "sandbox_backup_restore_duration_seconds_sum", purpose="RESTORE", outcome="failed") == 12


async def test_metrics_periodic_jobs_and_probes(seeded: BackupManager, api: httpx.AsyncClient) -> None:
    manager = seeded
    due_check = manager.jobs[0]
    assert await due_check.run_once() == 1
    probe = next(job for job in manager.jobs if job.name == "runner-health")
    await probe.run_once()

    # Another holder of the job's lock makes the next tick skip.
    lock = manager.ctx.coordinator.lock(keys.job_lock_name(due_check.name), ttl_s=30)
    assert await lock.acquire()
    assert await due_check.run_once() is None
    await lock.release()

    samples = await _scrape(api)
    assert _value(samples, "sandbox_backup_job_duration_seconds_count", periodic_job="due-check-running") == 1
    assert _value(samples, "sandbox_backup_job_skipped_total", periodic_job="due-check-running") == 1
    assert _value(samples, "sandbox_backup_lock_contention_total") == 1
    assert _value(samples, "sandbox_backup_runner_probes_total", runner="r1", result="unanswered") == 1


async def test_runner_agent_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The lifespan does not run under ASGITransport, so no engine is opened.
    settings = RunnerSettings(runner_id="r1", token="agent-token", state_path=tmp_path / "state.db", docker_host="unix:///nonexistent/docker.sock")
    transport = httpx.ASGITransport(app=create_runner_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    samples = _parse(response.text)
    assert _value(samples, "sandbox_backup_runner_backups_total", outcome="completed") == 0
    assert _value(samples, "sandbox_backup_runner_flattens_total") == 0
    assert _value(samples, "sandbox_backup_runner_push_duration_seconds_count") == 0
    assert _value(samples, "sandbox_backup_runner_commit_duration_seconds_count") == 0


async def _list(manager: BackupManager, sandbox_id: str) -> list[Backup]:
    async with manager.ctx.db.transaction() as session:
        return await backups.list_for_sandbox(session, sandbox_id)
