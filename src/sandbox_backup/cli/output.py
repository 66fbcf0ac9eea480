"""Output of the client commands: rich tables for people, JSON for scripts."""

from __future__ import annotations

import datetime
import enum
import json
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()


class OutputFormat(str, enum.Enum):
    TABLE = "table"
    JSON = "json"


OutputOption = Annotated[OutputFormat, typer.Option("--output", "-o", help="Output format: table for people, json for scripts.")]


def print_json(data: Any) -> None:
    # Plain text, not rich, because rich would wrap long lines that scripts parse.
    typer.echo(json.dumps(data, indent=2))


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, title: str | None = None) -> None:
    table = Table(*columns, title=title)
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_fields(data: dict[str, Any]) -> None:
    """Print one object as a two-column field/value table."""
    print_table(("field", "value"), ((key, text(value)) for key, value in data.items()))


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def timestamp(value: str | None) -> str:
    """Shorten an ISO 8601 timestamp from the API to seconds, keeping its UTC offset."""
    if not value:
        return "-"
    parsed = parse_time(value)
    return parsed.strftime("%Y-%m-%d %H:%M:%S") + ("Z" if parsed.utcoffset() == datetime.timedelta(0) else parsed.strftime("%z"))


def parse_time(value: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(value)
    # The API writes naive times in UTC on SQLite.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def duration(seconds: float) -> str:
    """Format a duration in seconds as e.g. `3d 4h`, `2h 5m` or `40s`. A negative duration keeps its sign."""
    if seconds < 0:
        return "-" + duration(-seconds)
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
