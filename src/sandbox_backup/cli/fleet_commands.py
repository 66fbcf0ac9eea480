"""Client commands for the fleet: status, sandboxes, runners and registries."""

from __future__ import annotations

import collections
import datetime
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import typer

from sandbox_backup.cli import output
from sandbox_backup.cli.client_commands import TimeoutOption, print_object, wait_until
from sandbox_backup.cli.http import EXIT_USAGE, PAGE_SIZE, ManagerClient, ManagerUrlOption, TokenOption, UrlOption, fail, prompt_secret, secret_from_env
from sandbox_backup.cli.output import OutputFormat, OutputOption

RUNNER_STATES = ("READY", "NOT_READY", "DRAINING", "UNRESPONSIVE")
DETAIL_FETCH_THREADS = 8


def status(url: UrlOption = None, token: TokenOption = None, output_format: OutputOption = OutputFormat.TABLE) -> None:
    """Summarize the fleet: backup states, the stalest running sandbox, runner load, owed deletions."""
    with ManagerClient(url, token) as client:
        sandboxes = list(client.iter_sandboxes())
        runners = client.get("/api/v1/runners")
        owed = _owed_deletions(client, sandboxes)
    summary = summarize(sandboxes, runners, owed, now=datetime.datetime.now(datetime.timezone.utc))
    if output_format == OutputFormat.JSON:
        output.print_json(summary)
        return
    _print_status(summary)


def _owed_deletions(client: ManagerClient, sandboxes: list[dict[str, Any]]) -> int:
    # NOTE: the list endpoint leaves owedDeletions at 0, so this costs one GET per sandbox.
    def owed(sandbox_id: str) -> int:
        return int(client.get(f"/api/v1/sandboxes/{sandbox_id}")["owedDeletions"])

    with ThreadPoolExecutor(max_workers=DETAIL_FETCH_THREADS) as pool:
        return sum(pool.map(owed, [sandbox["id"] for sandbox in sandboxes]))


def summarize(sandboxes: list[dict[str, Any]], runners: list[dict[str, Any]], owed_deletions: int, *, now: datetime.datetime) -> dict[str, Any]:
    """Build the fleet summary that `status` prints; ages are seconds before `now`."""
    by_backup_state = collections.Counter(sandbox["backupState"] for sandbox in sandboxes)
    by_state = collections.Counter(sandbox["state"] for sandbox in sandboxes)
    running = [sandbox for sandbox in sandboxes if sandbox["state"] == "STARTED"]
    never_backed_up = [sandbox["id"] for sandbox in running if not sandbox.get("lastBackupAt")]
    stalest = min((sandbox for sandbox in running if sandbox.get("lastBackupAt")), key=lambda sandbox: output.parse_time(sandbox["lastBackupAt"]), default=None)

    # In flight and queued are the sandboxes whose current attempt is IN_PROGRESS or PENDING.
    load: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for sandbox in sandboxes:
        if sandbox.get("runnerId"):
            load[sandbox["runnerId"]][sandbox["backupState"]] += 1
    runner_rows = [
        {
            "id": runner["id"],
            "state": runner["state"],
            "region": runner.get("region"),
            "maxConcurrentBackups": runner.get("maxConcurrentBackups"),
            "inFlight": load[runner["id"]]["IN_PROGRESS"],
            "queued": load[runner["id"]]["PENDING"],
            "lastSeenAt": runner.get("lastSeenAt"),
        }
        for runner in runners
    ]
    return {
        "sandboxes": len(sandboxes),
        "sandboxesByState": dict(sorted(by_state.items())),
        "sandboxesByBackupState": dict(sorted(by_backup_state.items())),
        "running": len(running),
        "runningNeverBackedUp": len(never_backed_up),
        "oldestNewestBackup": (
            {
                "sandboxId": stalest["id"],
                "lastBackupAt": stalest["lastBackupAt"],
                "ageSeconds": round((now - output.parse_time(stalest["lastBackupAt"])).total_seconds()),
            }
            if stalest
            else None
        ),
        "runners": runner_rows,
        "owedDeletions": owed_deletions,
    }


def _print_status(summary: dict[str, Any]) -> None:
    output.print_table(
        ("backup state", "sandboxes"),
        [(state, str(count)) for state, count in summary["sandboxesByBackupState"].items()] + [("total", str(summary["sandboxes"]))],
        title="Sandboxes by backup state",
    )
    stalest = summary["oldestNewestBackup"]
    lines = [f"Running sandboxes: {summary['running']}, never backed up: {summary['runningNeverBackedUp']}"]
    if stalest:
        lines.append(f"Oldest newest backup of a running sandbox: {output.duration(stalest['ageSeconds'])} ago ({stalest['sandboxId']}, {output.timestamp(stalest['lastBackupAt'])})")
    else:
        lines.append("Oldest newest backup of a running sandbox: - (no running sandbox has a completed backup)")
    lines.append(f"Registry deletions owed: {summary['owedDeletions']}")
    for line in lines:
        output.console.print(line, highlight=False)
    output.print_table(
        ("runner", "state", "region", "in flight", "queued", "cap"),
        (
            (row["id"], row["state"], output.text(row["region"]), str(row["inFlight"]), str(row["queued"]), output.text(row["maxConcurrentBackups"] or "default"))
            for row in summary["runners"]
        ),
        title="Runners",
    )


def sandboxes_ls(
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=1000, help="Sandboxes fetched per API request.")] = PAGE_SIZE,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """List every sandbox registered with the manager, sorted by id."""
    with ManagerClient(url, token) as client:
        rows = list(client.iter_sandboxes(page_size))
    if output_format == OutputFormat.JSON:
        output.print_json(rows)
        return
    output.print_table(
        ("id", "state", "runner", "organization", "backup state", "last backup"),
        (
            (row["id"], row["state"], output.text(row.get("runnerId")), output.text(row.get("organizationId")), row["backupState"], output.timestamp(row.get("lastBackupAt")))
            for row in rows
        ),
    )


def sandboxes_show(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to show.")],
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Show one sandbox as the manager records it."""
    with ManagerClient(url, token) as client:
        print_object(client.get(f"/api/v1/sandboxes/{sandbox_id}"), output_format)


def runners_ls(url: UrlOption = None, token: TokenOption = None, output_format: OutputOption = OutputFormat.TABLE) -> None:
    """List the registered runners with their backups in flight and queued."""
    with ManagerClient(url, token) as client:
        runners = client.get("/api/v1/runners")
        sandboxes = list(client.iter_sandboxes())
    rows = summarize(sandboxes, runners, 0, now=datetime.datetime.now(datetime.timezone.utc))["runners"]
    for row, runner in zip(rows, runners):
        row["apiUrl"] = runner["apiUrl"]
    if output_format == OutputFormat.JSON:
        output.print_json(rows)
        return
    output.print_table(
        ("id", "url", "state", "region", "in flight", "queued", "cap", "last seen"),
        (
            (row["id"], row["apiUrl"], row["state"], output.text(row["region"]), str(row["inFlight"]), str(row["queued"]), output.text(row["maxConcurrentBackups"] or "default"), output.timestamp(row["lastSeenAt"]))
            for row in rows
        ),
    )


def runners_add(
    runner_id: Annotated[str, typer.Argument(help="Runner id, as sandboxes name it in runnerId.")],
    api_url: Annotated[str, typer.Option("--url", help="Base URL of the runner agent, e.g. http://10.0.0.5:8300.")],
    token_env: Annotated[str | None, typer.Option("--token-env", metavar="VAR", help="Environment variable that contains the runner agent's bearer token; without it the token is prompted for.")] = None,
    state: Annotated[str, typer.Option("--state", help=f"Runner state: {', '.join(RUNNER_STATES)}.")] = "READY",
    region: Annotated[str | None, typer.Option("--region", help="Region of the runner; restores prefer runners in the sandbox's region.")] = None,
    max_concurrent_backups: Annotated[int | None, typer.Option("--max-concurrent-backups", min=1, max=1000, help="Cap of backups in flight on this runner; default uses the manager's setting.")] = None,
    manager_url: ManagerUrlOption = None,
    manager_token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Register RUNNER_ID or replace its registration."""
    if state not in RUNNER_STATES:
        raise fail(f"invalid --state {state!r}: use one of {', '.join(RUNNER_STATES)}", EXIT_USAGE)
    secret = secret_from_env(token_env, "runner token") if token_env else prompt_secret("runner token", "--token-env")
    body: dict[str, Any] = {"apiUrl": api_url, "token": secret, "state": state, "region": region, "maxConcurrentBackups": max_concurrent_backups}
    with ManagerClient(manager_url, manager_token) as client:
        runner = client.put(f"/api/v1/runners/{runner_id}", body)
    print_object(runner, output_format)


def runners_drain(
    runner_id: Annotated[str, typer.Argument(help="Runner to drain.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every sandbox on the runner has a fresh backup and every stopped one has moved off.")] = False,
    timeout_s: TimeoutOption = 3600.0,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Drain RUNNER_ID: no new sandboxes land on it, its sandboxes are backed up, stopped ones move away."""
    with ManagerClient(url, token) as client:
        progress = client.post(f"/api/v1/runners/{runner_id}/drain")
        if wait:
            progress = _wait_for_drain(client, runner_id, timeout_s=timeout_s)
    if output_format == OutputFormat.JSON:
        output.print_json(progress)
    else:
        output.print_fields(progress)


def _wait_for_drain(client: ManagerClient, runner_id: str, *, timeout_s: float) -> dict[str, Any]:
    progress: dict[str, Any] = {}

    def poll() -> tuple[bool, str]:
        nonlocal progress
        progress = client.get(f"/api/v1/runners/{runner_id}/drain")
        if progress["state"] != "DRAINING":
            raise fail(f"drain of {runner_id} stopped: the runner is now {progress['state']}")
        # The drain job moves a stopped sandbox only after its fresh backup, so one may still wait.
        stopped_left = 0
        if progress["remaining"] == 0 and progress["moving"] == 0:
            stopped_left = sum(1 for sandbox in client.iter_sandboxes() if sandbox.get("runnerId") == runner_id and sandbox["state"] == "STOPPED")
        done = progress["remaining"] == 0 and progress["moving"] == 0 and stopped_left == 0
        line = f"drain of {runner_id}: {progress['backedUp']}/{progress['sandboxes']} backed up, {progress['moving']} moving, {stopped_left} stopped waiting to move"
        return done, line

    wait_until(poll, what=f"drain of {runner_id}", timeout_s=timeout_s)
    return progress


def registries_ls(url: UrlOption = None, token: TokenOption = None, output_format: OutputOption = OutputFormat.TABLE) -> None:
    """List the registries backups are pushed to; passwords are write-only and never shown."""
    with ManagerClient(url, token) as client:
        rows = client.get("/api/v1/registries")
    if output_format == OutputFormat.JSON:
        output.print_json(rows)
        return
    output.print_table(
        ("id", "url", "project", "username", "region", "organization", "default"),
        (
            (row["id"], row["url"], output.text(row.get("project")), output.text(row.get("username")), output.text(row.get("region")), output.text(row.get("organizationId")), output.text(row["isDefault"]))
            for row in rows
        ),
    )


def registries_add(
    registry_id: Annotated[str, typer.Argument(help="Registry id.")],
    registry_url: Annotated[str, typer.Option("--url", help="Registry base URL, e.g. https://registry.example.com, without credentials or path.")],
    username: Annotated[str | None, typer.Option("--username", help="User name for the registry; the password is then read from --password-env or prompted for.")] = None,
    password_env: Annotated[str | None, typer.Option("--password-env", metavar="VAR", help="Environment variable that contains the registry password.")] = None,
    project: Annotated[str | None, typer.Option("--project", help="Path prefix of backup repositories; default sandbox-backup.")] = None,
    region: Annotated[str | None, typer.Option("--region", help="Region whose sandboxes use this registry.")] = None,
    organization_id: Annotated[str | None, typer.Option("--organization", help="Organization whose sandboxes use this registry.")] = None,
    default: Annotated[bool, typer.Option("--default", help="Use this registry for sandboxes that no other registry matches.")] = False,
    manager_url: ManagerUrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Register REGISTRY_ID or replace its registration."""
    password = None
    if password_env:
        password = secret_from_env(password_env, "registry password")
    elif username:
        password = prompt_secret("registry password", "--password-env")
    body: dict[str, Any] = {"url": registry_url, "username": username, "password": password, "project": project, "region": region, "organizationId": organization_id, "isDefault": default}
    with ManagerClient(manager_url, token) as client:
        registry = client.put(f"/api/v1/registries/{registry_id}", {key: value for key, value in body.items() if value is not None})
    print_object(registry, output_format)
