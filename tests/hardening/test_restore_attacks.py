"""Attacks on restore, move off a draining runner, archive and drill.

Runners and the registry are in-process fakes behind an httpx.MockTransport that replaces the
manager's HTTP clients (the registry's and each runner's), so no socket is opened. Backups are
inserted as COMPLETED rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest

from sandbox_backup.domain import reference
from sandbox_backup.domain.states import BackupState, BackupTrigger, RestorePurpose, RestoreState, SandboxState
from sandbox_backup.manager import lifecycle
from sandbox_backup.manager import restore as restore_flow
from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import restores
from sandbox_backup.store.models import Backup, Restore, Runner, Sandbox
from tests.fixtures.manager import add_registry, add_runner, add_sandbox
from tests.hardening.helpers import claim_all, get_sandbox, history, post_report

import sqlalchemy as sa

REGISTRY_URL = "http://127.0.0.1:7100"
RUNNER_URLS = {"r1": "http://127.0.0.1:7001", "r2": "http://127.0.0.1:7002", "r3": "http://127.0.0.1:7003"}
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"

Hook = Callable[[], Awaitable[None]]


@dataclasses.dataclass
class FakeRunner:
    """Containers on one runner: id to "started" or "stopped"."""

    containers: dict[str, str] = dataclasses.field(default_factory=dict)
    destroyed: list[str] = dataclasses.field(default_factory=list)
    # Called inside POST /sandboxes before the container is recorded.
    on_create: Hook | None = None
    # Status of POST /sandboxes after the container was recorded (a lost response when >= 500).
    create_status: int = 201
    creates: int = 0


@dataclasses.dataclass
class FakeRegistry:
    """Manifest bodies by repository and tag or digest, and the blobs that exist."""

    manifests: dict[tuple[str, str], bytes] = dataclasses.field(default_factory=dict)
    blobs: set[str] = dataclasses.field(default_factory=set)
    # Tags whose HEAD response lacks Docker-Content-Digest and whose GET response names a digest
    # algorithm other than sha256 or sha512 (blake3 here).
    odd_digest_tags: set[str] = dataclasses.field(default_factory=set)


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class FakeFleet:
    def __init__(self) -> None:
        self.runners = {name: FakeRunner() for name in RUNNER_URLS}
        self.registry = FakeRegistry()
        # Set to make the registry answer 503 to everything; registry_calls counts its requests.
        self.registry_down = False
        self.registry_calls = 0
        self._by_port = {httpx.URL(url).port: name for name, url in RUNNER_URLS.items()}

    def push(self, image_ref: str, *, with_blobs: bool = True) -> str:
        """Store an image under the reference's tag; return its manifest digest."""
        parsed = reference.parse_reference(image_ref)
        layer = "sha256:" + hashlib.sha256(image_ref.encode()).hexdigest()
        config = "sha256:" + hashlib.sha256(b"config" + image_ref.encode()).hexdigest()
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 10},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 20}],
            }
        ).encode()
        self.registry.manifests[(parsed.repository, parsed.tag or "")] = body
        self.registry.manifests[(parsed.repository, _digest(body))] = body
        if with_blobs:
            self.registry.blobs.update({layer, config})
        return _digest(body)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port
        if port in self._by_port:
            return await self._runner(self.runners[self._by_port[port]], request)
        return await self._registry(request)

    async def _runner(self, runner: FakeRunner, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/sandboxes":
            body = json.loads(request.content)
            runner.creates += 1
            if body["id"] in runner.containers:
                return httpx.Response(409, json={"message": "exists", "path": path, "statusCode": 409, "timestamp": "t", "code": "CONFLICT"})
            if runner.on_create is not None:
                hook, runner.on_create = runner.on_create, None
                await hook()
            runner.containers[body["id"]] = "stopped" if body.get("skipStart") else "started"
            return httpx.Response(runner.create_status, json={"id": body["id"], "daemonVersion": "fake"})
        parts = path.strip("/").split("/")
        if request.method == "POST" and len(parts) == 3 and parts[2] == "destroy":
            runner.containers.pop(parts[1], None)
            runner.destroyed.append(parts[1])
            return httpx.Response(200, json={})
        if request.method == "GET" and len(parts) == 2:
            state = runner.containers.get(parts[1])
            if state is None:
                return httpx.Response(404, json={"message": "not found", "path": path, "statusCode": 404, "timestamp": "t"})
            return httpx.Response(200, json={"state": state, "backupState": "NONE"})
        return httpx.Response(404, json={"message": "no route", "path": path, "statusCode": 404, "timestamp": "t"})

    async def _registry(self, request: httpx.Request) -> httpx.Response:
        self.registry_calls += 1
        if self.registry_down:
            return httpx.Response(503, text="registry unavailable")
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        if "/manifests/" in path:
            repository, _, ref = path[len("/v2/") :].partition("/manifests/")
            body = self.registry.manifests.get((repository, ref))
            if body is None:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]})
            headers = {"Docker-Content-Digest": _digest(body), "Content-Type": MANIFEST_TYPE, "Content-Length": str(len(body))}
            if ref in self.registry.odd_digest_tags:
                if request.method == "HEAD":
                    return httpx.Response(200, headers={"Content-Type": "application/json"})
                headers["Docker-Content-Digest"] = "blake3:" + hashlib.sha256(body).hexdigest()
            if request.method == "HEAD":
                return httpx.Response(200, headers=headers)
            return httpx.Response(200, headers=headers, content=body)
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[-1]
            return httpx.Response(200 if digest in self.registry.blobs else 404, headers={"Content-Length": "0"})
        return httpx.Response(404)


@pytest.fixture
async def fleet(manager: BackupManager, monkeypatch: pytest.MonkeyPatch) -> FakeFleet:
    fake = FakeFleet()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
    monkeypatch.setattr(manager.ctx, "http", client)
    monkeypatch.setattr(manager.ctx, "runner_http", lambda api_url: client)
    for runner_id, url in RUNNER_URLS.items():
        await add_runner(manager, runner_id, api_url=url)
    await add_registry(manager, url=REGISTRY_URL)
    yield fake
    await client.aclose()


async def _completed(manager: BackupManager, fleet: FakeFleet, sandbox_id: str, *, at: datetime.datetime, pushed: bool = True) -> Backup:
    """Insert a COMPLETED backup taken at `at`, pushed to the fake registry unless `pushed` is False."""
    image_ref = reference.build_backup_reference(REGISTRY_URL, "backups", sandbox_id, at)
    digest = fleet.push(image_ref) if pushed else "sha256:" + hashlib.sha256(image_ref.encode()).hexdigest()
    backup = Backup(
        id=str(uuid.uuid4()),
        sandbox_id=sandbox_id,
        registry_id="main",
        image_ref=image_ref,
        trigger=BackupTrigger.SCHEDULE,
        state=BackupState.COMPLETED,
        attempt=1,
        next_attempt_at=at,
        manifest_digest=digest,
        created_at=at,
        started_at=at,
        completed_at=at,
        updated_at=at,
        version=1,
    )
    async with manager.ctx.db.transaction() as session:
        session.add(backup)
        sandbox = await session.get(Sandbox, sandbox_id)
        sandbox.backup_registry_id = "main"
        sandbox.current_backup_id = backup.id
        sandbox.last_backup_at = at
        sandbox.last_backup_started_at = at
        sandbox.version += 1
    return backup


async def _restores(manager: BackupManager, sandbox_id: str) -> list[Restore]:
    async with manager.ctx.db.transaction() as session:
        return await restores.list_for_sandbox(session, sandbox_id)


async def test_move_after_start_keeps_running_copy(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    fleet.runners["r1"].containers["sb-1"] = "stopped"
    assert (await api.post("/api/v1/runners/r1/drain")).status_code == 200
    clock.advance(60)
    await _completed(manager, fleet, "sb-1", at=clock.now())
    clock.advance(60)

    # The drain job starts moving the stopped sandbox. Before the move runs, the user starts it.
    await manager.work_drains()
    assert [r.purpose for r in await _restores(manager, "sb-1")] == [RestorePurpose.MOVE.value]
    response = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "started"})
    assert response.status_code == 200
    fleet.runners["r1"].containers["sb-1"] = "started"
    await manager.run_restores()

    # A running sandbox stays on its runner during a drain: the move is abandoned, the running
    # container is not destroyed and no stopped copy is created elsewhere.
    assert fleet.runners["r1"].containers.get("sb-1") == "started"
    assert (await get_sandbox(manager, "sb-1")).runner_id == "r1"


async def test_move_never_uses_backup_older_than_drain(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    fleet.runners["r1"].containers["sb-1"] = "stopped"
    old = await _completed(manager, fleet, "sb-1", at=clock.now() - datetime.timedelta(days=1))
    assert (await api.post("/api/v1/runners/r1/drain")).status_code == 200
    clock.advance(60)
    # The fresh backup completed, but its tag is gone from the registry by the time the move runs.
    await _completed(manager, fleet, "sb-1", at=clock.now(), pushed=False)
    clock.advance(60)

    await manager.work_drains()
    await manager.run_restores()

    # A stopped sandbox moves only with a backup dispatched after the drain began. Without one it
    # stays on its runner with its newest data, and the old day-old backup is never used.
    (move,) = await _restores(manager, "sb-1")
    assert move.backup_id != old.id
    assert fleet.runners["r1"].containers.get("sb-1") == "stopped"
    assert (await get_sandbox(manager, "sb-1")).runner_id == "r1"


async def test_destroy_during_restore_stays_destroyed(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    await _completed(manager, fleet, "sb-1", at=clock.now())
    clock.advance(60)
    assert (await api.post("/api/v1/sandboxes/sb-1/restore", json={"runnerId": "r2"})).status_code == 202

    async def destroy() -> None:
        await lifecycle.handle_event(manager.ctx, "sb-1", lifecycle.LifecycleEvent.DESTROYED)

    # The platform destroys the sandbox while the runner pulls the backup.
    fleet.runners["r2"].on_create = destroy
    await manager.run_restores()

    # DESTROYED is final: a restore that finishes afterwards neither brings the sandbox back nor
    # leaves a running copy on the target runner.
    sandbox = await get_sandbox(manager, "sb-1")
    assert sandbox.state == SandboxState.DESTROYED
    assert "sb-1" not in fleet.runners["r2"].containers


async def test_archive_refuses_backup_found_broken(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STARTED)
    fleet.runners["r1"].containers["sb-1"] = "started"
    assert (await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "archive_requested"})).status_code == 200
    clock.advance(60)
    # The fresh backup completed and its tag resolves, but a layer blob is missing.
    fresh = await _completed(manager, fleet, "sb-1", at=clock.now())
    fleet.registry.blobs.clear()
    clock.advance(60)

    outcome = (await api.post(f"/api/v1/backups/{fresh.id}/verify")).json()["outcome"]
    assert outcome == "BROKEN"
    await manager.finish_archives()

    # A sandbox leaves its runner only after a verified backup: a backup known to be broken keeps
    # the container on the runner and the sandbox ARCHIVING.
    assert fleet.runners["r1"].containers.get("sb-1") == "started"
    assert (await get_sandbox(manager, "sb-1")).state == SandboxState.ARCHIVING


async def test_archive_pass_stops_calling_down_registry(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    fresh = {}
    for sandbox_id in ("sb-1", "sb-2", "sb-3"):
        await add_sandbox(manager, sandbox_id, runner_id="r1", state=SandboxState.STARTED)
        fleet.runners["r1"].containers[sandbox_id] = "started"
        assert (await api.post(f"/api/v1/sandboxes/{sandbox_id}/events", json={"type": "archive_requested"})).status_code == 200
    clock.advance(60)
    for sandbox_id in ("sb-1", "sb-2", "sb-3"):
        fresh[sandbox_id] = await _completed(manager, fleet, sandbox_id, at=clock.now())
    fleet.registry_down = True
    assert (await api.post(f"/api/v1/backups/{fresh['sb-1'].id}/verify")).json()["outcome"] == "UNKNOWN"
    calls_for_one = fleet.registry_calls
    fleet.registry_calls = 0

    # The first archive finds the registry down; the other two wait for the next pass without a call.
    assert await manager.finish_archives() == 0
    assert fleet.registry_calls == calls_for_one
    for sandbox_id in ("sb-1", "sb-2", "sb-3"):
        assert (await get_sandbox(manager, sandbox_id)).state == SandboxState.ARCHIVING

    fleet.registry_down = False
    assert await manager.finish_archives() == 3


async def test_restore_retry_after_lost_response(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    await _completed(manager, fleet, "sb-1", at=clock.now())
    clock.advance(60)
    assert (await api.post("/api/v1/sandboxes/sb-1/restore", json={"runnerId": "r2"})).status_code == 202

    # The runner creates the copy, but its response is lost (a 503 from a proxy in front of it).
    fleet.runners["r2"].create_status = 503
    await manager.run_restores()
    fleet.runners["r2"].create_status = 201
    clock.advance(3600)
    await manager.run_restores()

    # The retry finds the copy it created itself on the target runner: the restore completes and
    # the sandbox is STARTED there, with no orphaned copy left behind an ERROR sandbox.
    (restore,) = await _restores(manager, "sb-1")
    assert restore.state == RestoreState.COMPLETED.value
    sandbox = await get_sandbox(manager, "sb-1")
    assert sandbox.state == SandboxState.STARTED
    assert sandbox.runner_id == "r2"


async def test_verify_pass_survives_odd_digest_header(manager: BackupManager, fleet: FakeFleet, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await add_sandbox(manager, "sb-2", runner_id="r1")
    odd = await _completed(manager, fleet, "sb-1", at=clock.now() - datetime.timedelta(hours=2))
    fleet.registry.odd_digest_tags.add(reference.parse_reference(odd.image_ref).tag)
    normal = await _completed(manager, fleet, "sb-2", at=clock.now() - datetime.timedelta(hours=1))

    await manager.verify()

    # A registry response the client cannot check leaves that backup unverified and unchanged.
    # The pass goes on and verifies the other backups.
    async with manager.ctx.db.transaction() as session:
        assert (await session.get(Backup, normal.id, populate_existing=True)).verified_at is not None


async def test_restore_odd_digest_header_not_stuck(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    backup = await _completed(manager, fleet, "sb-1", at=clock.now())
    fleet.registry.odd_digest_tags.add(reference.parse_reference(backup.image_ref).tag)
    assert (await api.post("/api/v1/sandboxes/sb-1/restore", json={"runnerId": "r2"})).status_code == 202

    for _ in range(manager.ctx.settings.restore_max_attempts + 2):
        await manager.run_restores()
        clock.advance(3600)

    # A registry that cannot tell makes the restore wait and then fail with a reason: the
    # sandbox ends in ERROR, never stuck in RESTORING.
    sandbox = await get_sandbox(manager, "sb-1")
    assert sandbox.state == SandboxState.ERROR


async def test_restore_lease_covers_runner_call(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    fleet.runners["r1"].containers["sb-1"] = "stopped"
    await _completed(manager, fleet, "sb-1", at=clock.now())
    assert (await api.post("/api/v1/sandboxes/sb-1/restore", json={"runnerId": "r2"})).status_code == 202

    async def slow_pull() -> None:
        # The pull takes 20 minutes, well inside restore_timeout_s (30 minutes by default). A
        # second manager replica runs the restore job meanwhile.
        assert manager.ctx.settings.restore_timeout_s > 1200
        clock.advance(1200)
        await manager.run_restores()

    fleet.runners["r2"].on_create = slow_pull
    await manager.run_restores()

    # A restore is leased for as long as its runner call may take, so no second worker runs it
    # while the first still waits on the runner: the runner is asked once and the restore completes.
    assert fleet.runners["r2"].creates == 1
    (restore,) = await _restores(manager, "sb-1")
    assert restore.state == RestoreState.COMPLETED.value
    assert (await get_sandbox(manager, "sb-1")).state == SandboxState.STARTED


async def test_restore_respects_capacity_after_retry(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    async with manager.ctx.db.transaction() as session:
        for runner_id in ("r2", "r3"):
            runner = await session.get(Runner, runner_id)
            runner.capacity = 1
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    await add_sandbox(manager, "sb-2", runner_id="r1", state=SandboxState.STOPPED)
    await _completed(manager, fleet, "sb-1", at=clock.now())
    await _completed(manager, fleet, "sb-2", at=clock.now())

    # sb-1's restore picks r2, whose agent returns 503 once, so the restore waits and retries.
    assert (await api.post("/api/v1/sandboxes/sb-1/restore")).status_code == 202
    fleet.runners["r2"].create_status = 503
    fleet.runners["r2"].on_create = None
    await manager.run_restores()
    fleet.runners["r2"].containers.clear()
    fleet.runners["r2"].create_status = 201
    (first,) = await _restores(manager, "sb-1")
    assert first.state == RestoreState.RUNNING.value  # waiting to try again

    # sb-2's restore runs meanwhile and also chooses a runner with a free slot.
    assert (await api.post("/api/v1/sandboxes/sb-2/restore")).status_code == 202
    await manager.run_restores()
    clock.advance(3600)
    await manager.run_restores()

    # The target is a runner with a free slot, so a runner with capacity 1 never gets two sandboxes.
    async with manager.ctx.db.transaction() as session:
        rows = await session.execute(sa.select(Sandbox.runner_id).where(Sandbox.id.in_(["sb-1", "sb-2"])))
        placed = sorted(rows.scalars())
    assert placed == ["r2", "r3"]


async def _open_restores(manager: BackupManager, sandbox_id: str) -> list[Restore]:
    return [r for r in await _restores(manager, sandbox_id) if r.state in (RestoreState.PENDING.value, RestoreState.RUNNING.value)]


def _interleave_before_create(monkeypatch: pytest.MonkeyPatch, manager: BackupManager, purpose: RestorePurpose, racing: RestorePurpose) -> None:
    """Run a second request for `racing` after the `purpose` request checked for open restores
    and before it inserts its row: the interleaving two concurrent requests can produce."""
    original_create = restores.create
    fired = False

    async def race_then_create(session, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal fired
        if kwargs["purpose"] == purpose and not fired:
            fired = True
            await restore_flow.request_restore(manager.ctx, kwargs["sandbox_id"], purpose=racing)
        return await original_create(session, **kwargs)

    monkeypatch.setattr(restores, "create", race_then_create)


async def test_move_racing_restore_one_open(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one write transaction at a time, so the nested request would wait on the outer one")
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    assert (await api.post("/api/v1/runners/r1/drain")).status_code == 200
    clock.advance(60)
    await _completed(manager, fleet, "sb-1", at=clock.now())
    clock.advance(60)

    # The drain job starts a move while a user's restore request for the same sandbox commits.
    _interleave_before_create(monkeypatch, manager, RestorePurpose.MOVE, RestorePurpose.RESTORE)
    await manager.work_drains()

    # A sandbox never has two open restores: one of the two requests is rejected.
    assert len(await _open_restores(manager, "sb-1")) == 1


async def test_two_drills_one_open(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one write transaction at a time, so the nested request would wait on the outer one")
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await _completed(manager, fleet, "sb-1", at=clock.now())

    _interleave_before_create(monkeypatch, manager, RestorePurpose.DRILL, RestorePurpose.DRILL)
    response = await api.post("/api/v1/sandboxes/sb-1/drill")
    assert response.status_code == 202

    # Two drill requests at once share one drill: a second request returns the open one.
    assert len(await _open_restores(manager, "sb-1")) == 1


async def test_project_change_marks_nothing_broken(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    backup = await _completed(manager, fleet, "sb-1", at=clock.now())
    # The operator points new backups at another project. The old backup's tag is still whole in
    # the registry under the old project.
    response = await api.put("/api/v1/registries/main", json={"url": REGISTRY_URL, "project": "backups-v2", "isDefault": True})
    assert response.status_code == 200

    assert (await api.post("/api/v1/sandboxes/sb-1/restore", json={"runnerId": "r2"})).status_code == 202
    await manager.run_restores()

    # A backup is marked broken only on evidence from the registry or a runner. A changed
    # registry setting is no such evidence, so the backup stays restorable and is not pruned.
    async with manager.ctx.db.transaction() as session:
        row = await session.get(Backup, backup.id, populate_existing=True)
    assert row.broken_at is None


async def test_archive_event_during_restore_not_dropped(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient, clock) -> None:  # type: ignore[no-untyped-def]
    await add_sandbox(manager, "sb-1", runner_id="r1", state=SandboxState.STOPPED)
    await _completed(manager, fleet, "sb-1", at=clock.now())
    clock.advance(60)
    assert (await api.post("/api/v1/sandboxes/sb-1/restore", json={"runnerId": "r2"})).status_code == 202

    response = await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "archive_requested"})
    await manager.run_restores()
    sandbox = await get_sandbox(manager, "sb-1")

    # An archive request that arrives during a restore is either rejected with 409, or accepted
    # and carried out: an accepted archive never ends with the sandbox STARTED.
    if response.status_code == 200:
        assert sandbox.state in (SandboxState.ARCHIVING, SandboxState.ARCHIVED)
    else:
        assert response.status_code == 409


async def test_push_done_after_destroy_is_deleted(manager: BackupManager, fleet: FakeFleet, api: httpx.AsyncClient) -> None:
    await add_sandbox(manager, "sb-1", runner_id="r1")
    await manager.check_running_due()
    await claim_all(manager)
    attempt = (await history(manager, "sb-1"))[0]
    digest = fleet.push(attempt.image_ref)

    # The platform destroys the sandbox, then the push that was already running completes.
    assert (await api.post("/api/v1/sandboxes/sb-1/events", json={"type": "destroyed"})).status_code == 200
    report = {"sandboxId": "sb-1", "snapshot": attempt.image_ref, "state": "COMPLETED", "digest": digest}
    assert (await post_report(api, "r1", report)).status_code == 202

    # The owed cleanup empties the destroyed sandbox's repository, so every backup of it is marked
    # deleted, including one completed after the destroy: no live row points at a deleted manifest.
    (row,) = await history(manager, "sb-1")
    assert row.state == BackupState.COMPLETED
    assert row.deleted_at is not None
