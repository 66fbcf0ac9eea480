"""The `sandbox-backup` client commands, run as subprocesses against a real manager API on loopback.

The CLI blocks, so it runs in a worker thread while the manager keeps serving in the test's event
loop. A test completes a backup by claiming the attempt and posting the runner's report, as a
runner agent would. No runner or registry runs, so verification meets a closed loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox_backup.manager.service import BackupManager
from sandbox_backup.store import backups, fleet
from tests.fixtures.live import free_port, register_registry, register_runner, register_sandbox
from tests.fixtures.manager import API_TOKEN, add_registry, add_runner, add_sandbox

DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    # The commands only speak HTTP, so one database backend is enough here.
    return sqlite_database_url


@pytest.fixture
def cli_env(tmp_path: Path, manager_url: str) -> dict[str, str]:
    """Environment of a CLI run: the test manager, and a HOME without a config file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SANDBOX_BACKUP_")}
    env.update({"HOME": str(tmp_path), "COLUMNS": "250", "SANDBOX_BACKUP_URL": manager_url, "SANDBOX_BACKUP_TOKEN": API_TOKEN})
    return env


async def run_cli(env: dict[str, str], *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sandbox_backup.cli.main", *args]
    return await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=120, input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL)


async def claim_pending(manager: BackupManager) -> list[backups.DispatchCandidate]:
    ctx = manager.ctx
    async with ctx.db.transaction() as session:
        candidates = await backups.dispatch_candidates(session, now=ctx.now(), default_cap=ctx.settings.max_concurrent_backups_per_runner, limit=100)
    claimed = []
    for candidate in candidates:
        async with ctx.db.transaction() as session:
            if await backups.claim_batch(session, [candidate], now=ctx.now()):
                claimed.append(candidate)
    return claimed


async def report(manager_api: httpx.AsyncClient, sandbox_id: str, state: str, **extra: Any) -> None:
    history = (await manager_api.get(f"/api/v1/sandboxes/{sandbox_id}/backups")).json()
    body = {"sandboxId": sandbox_id, "snapshot": history[0]["imageRef"], "state": state, **extra}
    response = await manager_api.post("/api/v1/runners/r1/reports", json=body, headers={"Authorization": "Bearer runner-token"})
    assert response.json() == {"accepted": True}


async def complete_backup(manager: BackupManager, manager_api: httpx.AsyncClient, sandbox_id: str) -> dict[str, Any]:
    response = await manager_api.post(f"/api/v1/sandboxes/{sandbox_id}/backup")
    assert response.status_code == 202, response.text
    assert [c.sandbox_id for c in await claim_pending(manager)] == [sandbox_id]
    await report(manager_api, sandbox_id, "COMPLETED", digest=DIGEST, sizeBytes=2048)
    return (await manager_api.get(f"/api/v1/backups/{response.json()['id']}")).json()


@pytest.fixture
async def fleet_of_three(manager: BackupManager, manager_api: httpx.AsyncClient) -> BackupManager:
    """r1 with sb-done (backed up), sb-running (IN_PROGRESS) and sb-queued (PENDING)."""
    await add_runner(manager, "r1")
    await add_registry(manager)
    for sandbox_id in ("sb-done", "sb-queued", "sb-running"):
        await add_sandbox(manager, sandbox_id, runner_id="r1")
    await complete_backup(manager, manager_api, "sb-done")
    assert (await manager_api.post("/api/v1/sandboxes/sb-running/backup")).status_code == 202
    assert [c.sandbox_id for c in await claim_pending(manager)] == ["sb-running"]
    assert (await manager_api.post("/api/v1/sandboxes/sb-queued/backup")).status_code == 202
    return manager


async def test_status_json_summarizes_fleet(fleet_of_three: BackupManager, cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "status", "-o", "json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sandboxes"] == 3
    assert summary["sandboxesByBackupState"] == {"COMPLETED": 1, "IN_PROGRESS": 1, "PENDING": 1}
    assert summary["runningNeverBackedUp"] == 2
    assert summary["oldestNewestBackup"]["sandboxId"] == "sb-done"
    assert summary["runners"][0]["id"] == "r1"
    assert summary["runners"][0]["inFlight"] == 1
    assert summary["runners"][0]["queued"] == 1
    assert summary["owedDeletions"] == 0


async def test_status_table_counts_owed_deletions(fleet_of_three: BackupManager, cli_env: dict[str, str]) -> None:
    destroyed = await run_cli(cli_env, "destroy", "sb-done", "--yes", "-o", "json")
    assert destroyed.returncode == 0, destroyed.stderr
    assert json.loads(destroyed.stdout)["state"] == "DESTROYED"

    result = await run_cli(cli_env, "status")

    assert result.returncode == 0, result.stderr
    assert "Registry deletions owed: 1" in result.stdout
    assert "Sandboxes by backup state" in result.stdout
    assert "Runners" in result.stdout


async def test_sandboxes_ls_follows_pages(manager: BackupManager, cli_env: dict[str, str]) -> None:
    await add_runner(manager, "r1")
    expected = [f"sb-{index}" for index in range(5)]
    for sandbox_id in expected:
        await add_sandbox(manager, sandbox_id, runner_id="r1")

    as_json = await run_cli(cli_env, "sandboxes", "ls", "--page-size", "2", "-o", "json")
    as_table = await run_cli(cli_env, "sandboxes", "ls", "--page-size", "2")

    assert as_json.returncode == 0, as_json.stderr
    assert [row["id"] for row in json.loads(as_json.stdout)] == expected
    assert as_table.returncode == 0, as_table.stderr
    for sandbox_id in expected:
        assert sandbox_id in as_table.stdout


async def test_sandboxes_show_unknown_fails(manager: BackupManager, cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "sandboxes", "show", "no-such-sandbox")

    assert result.returncode == 1
    assert "sandbox 'no-such-sandbox' is not known to the manager" in result.stderr
    assert "404" in result.stderr


async def test_backups_ls_json(fleet_of_three: BackupManager, cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "backups", "ls", "sb-done", "-o", "json")

    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1
    assert rows[0]["state"] == "COMPLETED"
    assert rows[0]["manifestDigest"] == DIGEST
    assert rows[0]["sizeBytes"] == 2048
    assert "backup-sb-done:" in rows[0]["imageRef"]


async def test_backups_ls_table_columns(fleet_of_three: BackupManager, cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "backups", "ls", "sb-done")

    assert result.returncode == 0, result.stderr
    for column in ("id", "reference", "digest", "size", "state", "created", "verified"):
        assert column in result.stdout
    assert "2.0 KiB" in result.stdout
    assert "COMPLETED" in result.stdout


async def test_backup_wait_follows_report(manager: BackupManager, manager_api: httpx.AsyncClient, cli_env: dict[str, str]) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    run = asyncio.create_task(run_cli(cli_env, "backup", "sb-1", "--wait", "--timeout", "60", "-o", "json"))
    while not await claim_pending(manager):
        assert not run.done(), run.result().stderr
        await asyncio.sleep(0.05)
    await report(manager_api, "sb-1", "COMPLETED", digest=DIGEST, sizeBytes=10)

    result = await run

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["state"] == "COMPLETED"


async def test_backup_wait_error_exits_1(manager: BackupManager, manager_api: httpx.AsyncClient, cli_env: dict[str, str]) -> None:
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    run = asyncio.create_task(run_cli(cli_env, "backup", "sb-1", "--wait", "--timeout", "60"))
    while not await claim_pending(manager):
        assert not run.done(), run.result().stderr
        await asyncio.sleep(0.05)
    await report(manager_api, "sb-1", "FAILED", error="push denied", recoverable=False)

    result = await run

    assert result.returncode == 1
    assert "ended in ERROR" in result.stderr
    assert "push denied" in result.stderr


async def test_runners_add_token_from_env(manager: BackupManager, cli_env: dict[str, str]) -> None:
    secret = "runner-secret-5f2a9c"
    env = {**cli_env, "NODE7_TOKEN": secret}

    added = await run_cli(env, "runners", "add", "node-7", "--url", "http://127.0.0.1:9", "--token-env", "NODE7_TOKEN", "--max-concurrent-backups", "3")
    listed = await run_cli(env, "runners", "ls", "-o", "json")

    assert added.returncode == 0, added.stderr
    assert listed.returncode == 0, listed.stderr
    for result in (added, listed):
        assert secret not in result.stdout
        assert secret not in result.stderr
    assert [(row["id"], row["maxConcurrentBackups"]) for row in json.loads(listed.stdout)] == [("node-7", 3)]
    async with manager.ctx.db.transaction() as session:
        stored = await fleet.get_runner(session, "node-7")
    assert stored.token == secret


async def test_runners_add_without_token_is_usage_error(manager: BackupManager, cli_env: dict[str, str]) -> None:
    unset = await run_cli(cli_env, "runners", "add", "node-7", "--url", "http://127.0.0.1:9", "--token-env", "UNSET_VARIABLE")
    no_terminal = await run_cli(cli_env, "runners", "add", "node-7", "--url", "http://127.0.0.1:9")

    assert unset.returncode == 2
    assert "UNSET_VARIABLE" in unset.stderr
    assert no_terminal.returncode == 2
    assert "--token-env" in no_terminal.stderr


async def test_registries_add_hides_password(manager: BackupManager, cli_env: dict[str, str]) -> None:
    password = "registry-pass-81d0e4"
    env = {**cli_env, "REGISTRY_PASSWORD": password}

    added = await run_cli(env, "registries", "add", "main", "--url", "http://127.0.0.1:5999", "--username", "backup", "--password-env", "REGISTRY_PASSWORD", "--project", "team-a", "--default")
    table = await run_cli(env, "registries", "ls")
    as_json = await run_cli(env, "registries", "ls", "-o", "json")

    for result in (added, table, as_json):
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout
        assert password not in result.stderr
    assert "team-a" in table.stdout
    (row,) = json.loads(as_json.stdout)
    assert "password" not in row
    assert row["username"] == "backup"
    assert row["isDefault"] is True
    async with manager.ctx.db.transaction() as session:
        (stored,) = await fleet.list_registries(session)
    assert stored.password == password


async def test_prune_dry_run_deletes_nothing(manager: BackupManager, manager_api: httpx.AsyncClient, cli_env: dict[str, str], clock) -> None:  # type: ignore[no-untyped-def]
    await add_runner(manager, "r1")
    await add_registry(manager)
    await add_sandbox(manager, "sb-1", runner_id="r1")
    older = await complete_backup(manager, manager_api, "sb-1")
    clock.advance(60)
    newer = await complete_backup(manager, manager_api, "sb-1")
    keep_one = {"keepLast": 1, "keepHourly": 0, "keepDaily": 0, "keepWeekly": 0, "keepMonthly": 0, "minVerified": 0}
    assert (await manager_api.put("/api/v1/sandboxes/sb-1/retention", json=keep_one)).status_code == 200

    as_json = await run_cli(cli_env, "prune", "sb-1", "--dry-run", "-o", "json")
    as_table = await run_cli(cli_env, "prune", "--dry-run")

    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["dryRun"] is True
    assert result["sandboxes"][0]["deleted"] == [older["id"]]
    assert list(result["sandboxes"][0]["kept"]) == [newer["id"]]
    assert as_table.returncode == 0, as_table.stderr
    assert "dry run: 1 backups would be deleted" in as_table.stdout
    assert older["id"] in as_table.stdout
    history = (await manager_api.get("/api/v1/sandboxes/sb-1/backups")).json()
    assert [row["deletedAt"] for row in history] == [None, None]


async def test_verify_unreachable_registry_exits_1(fleet_of_three: BackupManager, manager_api: httpx.AsyncClient, cli_env: dict[str, str]) -> None:
    (completed,) = (await manager_api.get("/api/v1/sandboxes/sb-done/backups")).json()

    result = await run_cli(cli_env, "verify", completed["id"], "-o", "json")

    assert result.returncode == 1
    assert json.loads(result.stdout)["outcome"] == "UNKNOWN"


async def test_archive_moves_to_archiving(fleet_of_three: BackupManager, cli_env: dict[str, str]) -> None:
    result = await run_cli(cli_env, "archive", "sb-done", "-o", "json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "ARCHIVING"


async def test_manager_down_exits_3(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "SANDBOX_BACKUP_URL": f"http://127.0.0.1:{free_port()}"}

    result = await run_cli(env, "sandboxes", "ls")

    assert result.returncode == 3
    assert "could not reach the manager" in result.stderr


async def test_wrong_token_exits_1(cli_env: dict[str, str]) -> None:
    wrong = "wrong-token-3b7e"
    env = {**cli_env, "SANDBOX_BACKUP_TOKEN": wrong}

    result = await run_cli(env, "status")

    assert result.returncode == 1
    assert "rejected the API token (401)" in result.stderr
    assert wrong not in result.stderr
    assert wrong not in result.stdout


async def test_usage_errors_exit_2(cli_env: dict[str, str]) -> None:
    no_token = {key: value for key, value in cli_env.items() if key != "SANDBOX_BACKUP_TOKEN"}

    bad_format = await run_cli(cli_env, "sandboxes", "ls", "-o", "yaml")
    missing_token = await run_cli(no_token, "sandboxes", "ls")

    assert bad_format.returncode == 2
    assert missing_token.returncode == 2
    assert "no API token" in missing_token.stderr


async def test_config_file_below_env(tmp_path: Path, manager: BackupManager, cli_env: dict[str, str]) -> None:
    await add_runner(manager, "r1")
    await add_sandbox(manager, "sb-1", runner_id="r1")
    config = tmp_path / "cli.toml"
    config.write_text(f'url = "{cli_env["SANDBOX_BACKUP_URL"]}"\ntoken = "{API_TOKEN}"\n')
    config.chmod(0o600)
    from_file = {key: value for key, value in cli_env.items() if not key.startswith("SANDBOX_BACKUP_")}
    from_file["SANDBOX_BACKUP_CLI_CONFIG"] = str(config)

    only_file = await run_cli(from_file, "sandboxes", "ls", "-o", "json")
    env_wins = await run_cli({**from_file, "SANDBOX_BACKUP_TOKEN": "wrong-token"}, "sandboxes", "ls")
    flag_wins = await run_cli(from_file, "sandboxes", "ls", "--url", f"http://127.0.0.1:{free_port()}")

    assert only_file.returncode == 0, only_file.stderr
    assert [row["id"] for row in json.loads(only_file.stdout)] == ["sb-1"]
    assert env_wins.returncode == 1
    assert flag_wins.returncode == 3


@pytest.mark.slow
async def test_backup_and_restore_with_real_runners(manager: BackupManager, manager_url: str, manager_api: httpx.AsyncClient, cli_env: dict[str, str], runner_agent_factory, sandbox_container, registry_server, second_podman_engine) -> None:  # type: ignore[no-untyped-def]
    node1 = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url, runner_id="node-1")
    node2 = await asyncio.to_thread(runner_agent_factory, manager_url=manager_url, runner_id="node-2", docker_host=second_podman_engine.docker_host)
    container = sandbox_container()
    for agent in (node1, node2):
        await register_runner(manager_api, agent)
    await register_registry(manager_api, registry_server.url, registry_server)
    await register_sandbox(manager_api, container.name, "node-1")
    # Registering a running sandbox queues its first backup at once; let it finish first, so the
    # CLI's request below is the one in flight whatever the moment its process starts.
    sandbox_path = f"/api/v1/sandboxes/{container.name}"
    await _wait_until(manager_api, sandbox_path, lambda body: body["backupState"] == "PENDING")
    assert await manager.dispatch_pending() == 1
    await _wait_until(manager_api, sandbox_path, lambda body: body["backupState"] == "COMPLETED")
    # The manual clock stands still; the next backup needs a tag of its own.
    manager.ctx.clock.advance(1)

    # The CLI waits while the test runs the dispatch job, as a manager replica would.
    backing_up = asyncio.create_task(run_cli(cli_env, "backup", container.name, "--wait", "--timeout", "60", "-o", "json"))
    await _wait_until(manager_api, f"/api/v1/sandboxes/{container.name}", lambda body: body["backupState"] == "PENDING")
    assert await manager.dispatch_pending() == 1
    result = await backing_up
    assert result.returncode == 0, result.stderr
    (attempt,) = json.loads(result.stdout)
    assert attempt["state"] == "COMPLETED"
    assert attempt["manifestDigest"].startswith("sha256:")

    restoring = asyncio.create_task(run_cli(cli_env, "restore", container.name, "--runner", "node-2", "--wait", "--timeout", "60", "-o", "json"))
    await _wait_until(manager_api, f"/api/v1/sandboxes/{container.name}", lambda body: body["state"] == "RESTORING")
    assert await manager.run_restores() == 1
    result = await restoring
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "COMPLETED"
    shown = json.loads((await run_cli(cli_env, "sandboxes", "show", container.name, "-o", "json")).stdout)
    assert shown["runnerId"] == "node-2"
    assert shown["state"] == "STARTED"
    second_podman_engine.client.api.remove_container(container.name, force=True)


async def _wait_until(api: httpx.AsyncClient, path: str, predicate, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `path` until `predicate` holds for its JSON body: the CLI process needs a moment to start."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate((await api.get(path)).json()):
        assert asyncio.get_running_loop().time() < deadline, f"{path} never matched"
        await asyncio.sleep(0.1)
