"""Client commands for one sandbox's backups: backup, backups ls, restore, archive, destroy, verify, prune."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape

from sandbox_backup.cli import output
from sandbox_backup.cli.http import EXIT_FAILED, ManagerClient, TokenOption, UrlOption, err_console, fail
from sandbox_backup.cli.output import OutputFormat, OutputOption

FINAL_BACKUP_STATES = {"COMPLETED", "ERROR"}
FINAL_RESTORE_STATES = {"COMPLETED", "FAILED"}
POLL_INTERVAL_S = 0.5

TimeoutOption = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait with --wait before giving up with exit code 1.")]


def backup(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to back up.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the backup is COMPLETED or ERROR.")] = False,
    timeout_s: TimeoutOption = 600.0,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Request a backup of SANDBOX_ID now."""
    with ManagerClient(url, token) as client:
        attempt = client.post(f"/api/v1/sandboxes/{sandbox_id}/backup")
        if wait:
            attempt = _wait_for_backup(client, sandbox_id, attempt, timeout_s=timeout_s)
    print_backups([attempt], output_format)
    if attempt["state"] == "ERROR":
        raise fail(f"backup {attempt['id']} of {sandbox_id} ended in ERROR: {attempt.get('errorReason') or 'no reason recorded'}")


def _wait_for_backup(client: ManagerClient, sandbox_id: str, attempt: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """Follow the sandbox's current attempt (retries included) until it ends."""

    def poll() -> tuple[bool, str]:
        nonlocal attempt
        sandbox = client.get(f"/api/v1/sandboxes/{sandbox_id}")
        current_id = sandbox.get("currentBackupId") or attempt["id"]
        attempt = client.get(f"/api/v1/backups/{current_id}")
        done = attempt["state"] in FINAL_BACKUP_STATES and sandbox["backupState"] not in ("PENDING", "IN_PROGRESS")
        return done, f"backup of {sandbox_id}: {attempt['state']} (attempt {attempt['attempt']})"

    wait_until(poll, what=f"backup of {sandbox_id}", timeout_s=timeout_s)
    return attempt


def wait_until(poll: Callable[[], tuple[bool, str]], *, what: str, timeout_s: float) -> None:
    """Call `poll` until it returns done, showing its status line on stderr; exit 1 on timeout."""
    deadline = time.monotonic() + timeout_s
    with err_console.status(what) as status:
        while True:
            done, line = poll()
            status.update(escape(line))
            if done:
                return
            if time.monotonic() > deadline:
                raise fail(f"timed out after {timeout_s:.0f} s: {line}; raise --timeout or check again later")
            time.sleep(POLL_INTERVAL_S)


def backups_ls(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox whose backups to list.")],
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """List the backup attempts of SANDBOX_ID, newest first."""
    with ManagerClient(url, token) as client:
        print_backups(client.get(f"/api/v1/sandboxes/{sandbox_id}/backups"), output_format)


def show(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to show.")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show one sandbox as the manager records it (JSON); same as `sandboxes show -o json`."""
    with ManagerClient(url, token) as client:
        output.print_json(client.get(f"/api/v1/sandboxes/{sandbox_id}"))


def print_backups(rows: list[dict[str, Any]], output_format: OutputFormat) -> None:
    if output_format == OutputFormat.JSON:
        output.print_json(rows)
        return
    output.print_table(
        ("id", "reference", "digest", "size", "state", "created", "verified"),
        (
            (
                row["id"],
                row["imageRef"],
                _short_digest(row.get("manifestDigest")),
                output.size(row.get("sizeBytes")),
                _backup_state(row),
                output.timestamp(row["createdAt"]),
                output.timestamp(row.get("verifiedAt")),
            )
            for row in rows
        ),
    )


def _short_digest(digest: str | None) -> str:
    return digest[:19] if digest else "-"


def _backup_state(row: dict[str, Any]) -> str:
    if row.get("deletedAt"):
        return f"{row['state']} (deleted)"
    if row.get("brokenAt"):
        return f"{row['state']} (broken)"
    return str(row["state"])


def restore(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to restore.")],
    backup_id: Annotated[str | None, typer.Option("--backup", help="Restore this backup only; default tries the newest verified backup first, then older ones.")] = None,
    runner_id: Annotated[str | None, typer.Option("--runner", help="Restore onto this READY runner; default lets the manager choose.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the restore until it is COMPLETED or FAILED.")] = False,
    timeout_s: TimeoutOption = 1800.0,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Restore SANDBOX_ID from a backup onto a runner."""
    body = {key: value for key, value in (("backupId", backup_id), ("runnerId", runner_id)) if value}
    with ManagerClient(url, token) as client:
        started = client.post(f"/api/v1/sandboxes/{sandbox_id}/restore", body)
        if wait:
            started = _wait_for_restore(client, started, timeout_s=timeout_s)
    _print_restore(started, output_format)
    if started["state"] == "FAILED":
        raise fail(f"restore {started['id']} of {sandbox_id} FAILED: {started.get('errorReason') or 'no reason recorded'}")


def _wait_for_restore(client: ManagerClient, started: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    current = started

    def poll() -> tuple[bool, str]:
        nonlocal current
        current = client.get(f"/api/v1/restores/{started['id']}")
        line = f"restore of {current['sandboxId']}: {current['state']}"
        if current.get("backupId"):
            line += f", backup {current['backupId']}"
        if current.get("runnerId"):
            line += f" onto {current['runnerId']}"
        if current.get("registryAttempts"):
            line += f", registry tries {current['registryAttempts']}"
        return current["state"] in FINAL_RESTORE_STATES, line

    wait_until(poll, what=f"restore of {started['sandboxId']}", timeout_s=timeout_s)
    return current


def _print_restore(row: dict[str, Any], output_format: OutputFormat) -> None:
    if output_format == OutputFormat.JSON:
        output.print_json(row)
        return
    keys = ("id", "sandboxId", "purpose", "state", "backupId", "runnerId", "previousRunnerId", "registryAttempts", "errorReason", "createdAt", "completedAt")
    output.print_fields({key: row.get(key) for key in keys})


def archive(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to archive.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the sandbox is ARCHIVED: backed up, verified and removed from its runner.")] = False,
    timeout_s: TimeoutOption = 1800.0,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Archive SANDBOX_ID: back it up, verify the backup, then remove it from its runner."""
    with ManagerClient(url, token) as client:
        sandbox = client.post(f"/api/v1/sandboxes/{sandbox_id}/events", {"type": "archive_requested"})
        if wait:
            sandbox = _wait_for_archive(client, sandbox_id, timeout_s=timeout_s)
    print_object(sandbox, output_format)


def _wait_for_archive(client: ManagerClient, sandbox_id: str, *, timeout_s: float) -> dict[str, Any]:
    sandbox: dict[str, Any] = {}

    def poll() -> tuple[bool, str]:
        nonlocal sandbox
        sandbox = client.get(f"/api/v1/sandboxes/{sandbox_id}")
        if sandbox["state"] not in ("ARCHIVING", "ARCHIVED"):
            raise fail(f"archive of {sandbox_id} stopped: the sandbox is now {sandbox['state']}" + (f" ({sandbox['errorReason']})" if sandbox.get("errorReason") else ""))
        return sandbox["state"] == "ARCHIVED", f"archive of {sandbox_id}: {sandbox['state']}, backup {sandbox['backupState']}"

    wait_until(poll, what=f"archive of {sandbox_id}", timeout_s=timeout_s)
    return sandbox


def destroy(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to destroy.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Record SANDBOX_ID as destroyed; the manager then deletes all its backups from the registry."""
    if not yes:
        typer.confirm(f"Destroy {sandbox_id} and delete all of its backups?", abort=True, err=True)
    with ManagerClient(url, token) as client:
        sandbox = client.post(f"/api/v1/sandboxes/{sandbox_id}/events", {"type": "destroyed"})
    print_object(sandbox, output_format)


def print_object(data: dict[str, Any], output_format: OutputFormat) -> None:
    if output_format == OutputFormat.JSON:
        output.print_json(data)
    else:
        output.print_fields(data)


def verify(
    backup_id: Annotated[str, typer.Argument(help="Backup to check against the registry.")],
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Check that BACKUP_ID's tag resolves to its recorded digest and every blob exists.

    Exits 1 when the backup is BROKEN or the registry could not tell (UNKNOWN).
    """
    with ManagerClient(url, token) as client:
        result = client.post(f"/api/v1/backups/{backup_id}/verify")
    if output_format == OutputFormat.JSON:
        output.print_json(result)
    else:
        found = result["backup"]
        output.print_fields(
            {
                "outcome": result["outcome"],
                "backup": found["id"],
                "sandbox": found["sandboxId"],
                "reference": found["imageRef"],
                "digest": found.get("manifestDigest"),
                "size": output.size(found.get("sizeBytes")),
                "layers": found.get("layerCount"),
                "verified": output.timestamp(found.get("verifiedAt")),
                "broken reason": found.get("brokenReason"),
            }
        )
    if result["outcome"] != "VERIFIED":
        raise typer.Exit(EXIT_FAILED)


def prune(
    sandbox_id: Annotated[str | None, typer.Argument(help="Sandbox to prune; default prunes every sandbox.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what the retention policy would delete.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    output_format: OutputOption = OutputFormat.TABLE,
) -> None:
    """Delete backups that the retention policy no longer keeps. Exits 1 if any sandbox failed."""
    path = f"/api/v1/sandboxes/{sandbox_id}/prune" if sandbox_id else "/api/v1/prune"
    with ManagerClient(url, token) as client:
        result = client.post(path, dryRun=str(dry_run).lower())
    if output_format == OutputFormat.JSON:
        output.print_json(result)
    else:
        verb = "to delete" if result["dryRun"] else "deleted"
        output.print_table(
            ("sandbox", f"backups {verb}", "kept", "error"),
            ((entry["sandboxId"], "\n".join(entry["deleted"]) or "-", str(len(entry["kept"])), output.text(entry.get("error"))) for entry in result["sandboxes"]),
            title=f"dry run: {result['pruned']} backups would be deleted" if result["dryRun"] else f"{result['pruned']} backups deleted",
        )
    failed = [entry["sandboxId"] for entry in result["sandboxes"] if entry.get("error")]
    if failed:
        raise fail(f"pruning failed for {len(failed)} sandboxes: {', '.join(failed[:10])}; see the error column")
