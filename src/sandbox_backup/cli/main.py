"""The `sandbox-backup` command: servers (serve, runner serve, up) and client commands."""

from __future__ import annotations

import typer

from sandbox_backup.cli import client_commands, config_commands, fleet_commands, server_commands

HELP = """Backup control plane for fleets of container sandboxes.

Client commands call the manager API at --url or SANDBOX_BACKUP_URL with the token from --token or SANDBOX_BACKUP_TOKEN. Unset values come from the TOML file named by SANDBOX_BACKUP_CLI_CONFIG, else ~/.config/sandbox-backup/cli.toml (keys url and token).

Exit codes:

  0  success

  1  the operation failed: the API returned an error (4xx or 5xx), a backup ended in ERROR, a restore FAILED, a verify did not confirm the backup, or a wait timed out

  2  invalid usage or configuration

  3  the manager could not be reached
"""

app = typer.Typer(name="sandbox-backup", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False)
runner_app = typer.Typer(help="The runner agent that runs on every node.", no_args_is_help=True)
app.add_typer(runner_app, name="runner")
backups_app = typer.Typer(help="List a sandbox's backups.", no_args_is_help=True)
app.add_typer(backups_app, name="backups")
sandboxes_app = typer.Typer(help="List and show sandboxes.", no_args_is_help=True)
app.add_typer(sandboxes_app, name="sandboxes")
runners_app = typer.Typer(help="List, register and drain runners.", no_args_is_help=True)
app.add_typer(runners_app, name="runners")
registries_app = typer.Typer(help="List and register the registries backups are pushed to.", no_args_is_help=True)
app.add_typer(registries_app, name="registries")
config_app = typer.Typer(help="Show the manager's effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

app.command("serve")(server_commands.serve)
app.command("up")(server_commands.up)
runner_app.command("serve")(server_commands.runner_serve)

app.command("status")(fleet_commands.status)
app.command("backup")(client_commands.backup)
backups_app.command("ls")(client_commands.backups_ls)
app.command("show")(client_commands.show)
app.command("restore")(client_commands.restore)
app.command("archive")(client_commands.archive)
app.command("destroy")(client_commands.destroy)
app.command("verify")(client_commands.verify)
app.command("prune")(client_commands.prune)
sandboxes_app.command("ls")(fleet_commands.sandboxes_ls)
sandboxes_app.command("show")(fleet_commands.sandboxes_show)
runners_app.command("ls")(fleet_commands.runners_ls)
runners_app.command("add")(fleet_commands.runners_add)
runners_app.command("drain")(fleet_commands.runners_drain)
registries_app.command("ls")(fleet_commands.registries_ls)
registries_app.command("add")(fleet_commands.registries_add)
config_app.command("show")(config_commands.config_show)


if __name__ == "__main__":
    app()
