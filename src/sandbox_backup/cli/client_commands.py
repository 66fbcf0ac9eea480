"""Client commands that talk to the manager's REST API."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="SANDBOX_BACKUP_URL", help="Manager API base URL.")]
TokenOption = Annotated[str, typer.Option("--token", envvar="SANDBOX_BACKUP_TOKEN", help="Manager API bearer token.", show_default=False)]
OutputOption = Annotated[str, typer.Option("--output", "-o", help="table or json.")]

FINAL_STATES = {"COMPLETED", "ERROR"}


def _request(method: str, url: str, token: str, path: str) -> Any:
    try:
        response = httpx.request(method, url.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]could not reach the manager at {url}: {exc}[/red]")
        raise typer.Exit(1) from exc
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        err_console.print(f"[red]{method} {path} failed with {response.status_code}: {message}[/red]")
        raise typer.Exit(1)
    return response.json()


def backup(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to back up.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the backup is COMPLETED or ERROR.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 600.0,
    url: UrlOption = "http://127.0.0.1:8200",
    token: TokenOption = "",
    output: OutputOption = "table",
) -> None:
    """Request a backup of SANDBOX_ID now."""
    attempt = _request("POST", url, token, f"/api/v1/sandboxes/{sandbox_id}/backup")
    if wait:
        attempt = _wait_for_backup(url, token, sandbox_id, attempt, timeout_s=timeout_s)
    _print_backups([attempt], output)
    if attempt["state"] == "ERROR":
        raise typer.Exit(1)


def _wait_for_backup(url: str, token: str, sandbox_id: str, attempt: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """Follow the sandbox's current attempt (retries included) until it ends."""
    deadline = time.monotonic() + timeout_s
    with console.status(f"backup of {sandbox_id}: {attempt['state']}") as status:
        while True:
            sandbox = _request("GET", url, token, f"/api/v1/sandboxes/{sandbox_id}")
            current_id = sandbox.get("currentBackupId") or attempt["id"]
            attempt = _request("GET", url, token, f"/api/v1/backups/{current_id}")
            status.update(f"backup of {sandbox_id}: {attempt['state']} (attempt {attempt['attempt']})")
            if attempt["state"] in FINAL_STATES and sandbox["backupState"] not in ("PENDING", "IN_PROGRESS"):
                return attempt
            if time.monotonic() > deadline:
                err_console.print(f"[red]backup of {sandbox_id} still {attempt['state']} after {timeout_s:.0f} s[/red]")
                raise typer.Exit(1)
            time.sleep(0.5)


def backups_ls(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox whose backups to list.")],
    url: UrlOption = "http://127.0.0.1:8200",
    token: TokenOption = "",
    output: OutputOption = "table",
) -> None:
    """List the backup attempts of SANDBOX_ID, newest first."""
    _print_backups(_request("GET", url, token, f"/api/v1/sandboxes/{sandbox_id}/backups"), output)


def show(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox to show.")],
    url: UrlOption = "http://127.0.0.1:8200",
    token: TokenOption = "",
) -> None:
    """Show one sandbox as the manager records it (JSON)."""
    console.print_json(json.dumps(_request("GET", url, token, f"/api/v1/sandboxes/{sandbox_id}")))


def _print_backups(rows: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        console.print_json(json.dumps(rows))
        return
    table = Table("id", "reference", "digest", "size", "state", "attempt", "created")
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        size = row.get("sizeBytes")
        table.add_row(
            row["id"][:8],
            row["imageRef"],
            (row.get("manifestDigest") or "-")[:19],
            f"{size / 1e6:.1f} MB" if size else "-",
            row["state"],
            str(row["attempt"]),
            row["createdAt"][:19],
        )
    console.print(table)
