"""The `sandbox-backup` command: servers (serve, runner serve, up) and client commands."""

from __future__ import annotations

import typer

from sandbox_backup.cli import client_commands, server_commands

app = typer.Typer(
    name="sandbox-backup",
    help="Backup control plane for fleets of container sandboxes.\n\nExit codes: 0 success, 1 the operation failed, 2 invalid usage or configuration.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
runner_app = typer.Typer(help="The runner agent that runs on every node.", no_args_is_help=True)
app.add_typer(runner_app, name="runner")
backups_app = typer.Typer(help="List a sandbox's backups.", no_args_is_help=True)
app.add_typer(backups_app, name="backups")

app.command("serve")(server_commands.serve)
app.command("up")(server_commands.up)
runner_app.command("serve")(server_commands.runner_serve)
app.command("backup")(client_commands.backup)
backups_app.command("ls")(client_commands.backups_ls)
app.command("show")(client_commands.show)


if __name__ == "__main__":
    app()
