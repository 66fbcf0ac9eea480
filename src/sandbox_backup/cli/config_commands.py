"""`sandbox-backup config show`: the manager's effective settings and where each value came from."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import typer

from sandbox_backup.cli.output import OutputFormat, OutputOption, print_json, print_table, text
from sandbox_backup.config import CONFIG_FILE_ENV, ConfigError, describe_settings


def config_show(output_format: OutputOption = OutputFormat.TABLE) -> None:
    """Print every manager setting with its effective value and source (env, file or default). Secrets are masked.

    Reads the same SANDBOX_BACKUP_* variables and SANDBOX_BACKUP_CONFIG_FILE as `serve`. Exits 2 when a value is invalid.
    """
    try:
        views = describe_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc

    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not pathlib.Path(config_file).is_file():
        # pydantic-settings skips a missing file without an error, so warn about it here.
        typer.echo(f"warning: {CONFIG_FILE_ENV} names {config_file}, which is not a file, so no setting was read from it", err=True)

    if output_format == OutputFormat.JSON:
        print_json([dataclasses.asdict(view) for view in views])
        return
    rows = ((view.name, view.env_name, text(view.value), view.source) for view in views)
    print_table(("setting", "environment variable", "value", "source"), rows)
