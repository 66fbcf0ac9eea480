"""Connection settings and the HTTP client that the client commands use to call the manager API.

The URL and token come from `--url`/`--token`, then `SANDBOX_BACKUP_URL`/`SANDBOX_BACKUP_TOKEN`,
then the CLI config file, then the default URL. Failures print one message on stderr and exit
with the codes listed in the top-level help.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_URL = "http://127.0.0.1:8200"
CONFIG_ENV = "SANDBOX_BACKUP_CLI_CONFIG"
DEFAULT_CONFIG_PATH = Path("~/.config/sandbox-backup/cli.toml")
REQUEST_TIMEOUT_S = 30.0
PAGE_SIZE = 500  # GET /api/v1/sandboxes rejects a limit above 1000.

err_console = Console(stderr=True)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="SANDBOX_BACKUP_URL", help=f"Manager API base URL; default from the CLI config file, else {DEFAULT_URL}.", show_default=False),
]
# For commands whose own --url names a runner or a registry.
ManagerUrlOption = Annotated[
    str | None,
    typer.Option("--manager-url", envvar="SANDBOX_BACKUP_URL", help=f"Manager API base URL; default from the CLI config file, else {DEFAULT_URL}.", show_default=False),
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="SANDBOX_BACKUP_TOKEN", help="Manager API bearer token; prefer the SANDBOX_BACKUP_TOKEN variable or the CLI config file.", show_default=False),
]


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print `message` on stderr and return the exit to raise."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH).expanduser()


def _read_config() -> dict[str, str]:
    path = config_path()
    if not path.exists():
        if CONFIG_ENV in os.environ:
            raise fail(f"CLI config file {path} named by {CONFIG_ENV} does not exist; create it or unset {CONFIG_ENV}", EXIT_USAGE)
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise fail(f"could not read the CLI config file {path}: {exc}", EXIT_USAGE) from exc
    values: dict[str, str] = {}
    for key in ("url", "token"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise fail(f"invalid {key!r} in the CLI config file {path}: expected a non-empty string", EXIT_USAGE)
        values[key] = value
    if "token" in values and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(path))} contains the API token and other users can read it; run chmod 600 {escape(str(path))}", soft_wrap=True)
    return values


@dataclasses.dataclass(frozen=True)
class Connection:
    url: str
    token: str


def resolve_connection(url: str | None, token: str | None) -> Connection:
    """Fill the URL and token left unset by flags and environment from the config file."""
    config = _read_config() if url is None or token is None else {}
    url = url or config.get("url") or DEFAULT_URL
    token = token or config.get("token")
    if not token:
        raise fail(f"no API token: pass --token, set SANDBOX_BACKUP_TOKEN or set token in {config_path()}", EXIT_USAGE)
    return Connection(url=url.rstrip("/"), token=token)


class ManagerClient:
    """Blocking client of the manager's REST API that exits the CLI on any failure."""

    def __init__(self, url: str | None, token: str | None) -> None:
        connection = resolve_connection(url, token)
        self.url = connection.url
        try:
            self._client = httpx.Client(base_url=connection.url, headers={"Authorization": f"Bearer {connection.token}"}, timeout=REQUEST_TIMEOUT_S)
        except httpx.InvalidURL as exc:
            raise fail(f"invalid manager URL {connection.url!r}: {exc}", EXIT_USAGE) from exc

    def __enter__(self) -> ManagerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._client.request(method, path, json=json, params=params)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise fail(f"invalid manager URL {self.url!r}: {exc}", EXIT_USAGE) from exc
        except httpx.TransportError as exc:
            raise fail(f"could not reach the manager at {self.url}: {exc or type(exc).__name__}; check --url or SANDBOX_BACKUP_URL and that the manager is running", EXIT_UNREACHABLE) from exc
        if response.status_code == 401:
            raise fail(f"the manager at {self.url} rejected the API token (401): {_error_message(response)}. Check --token, SANDBOX_BACKUP_TOKEN or the CLI config file")
        if response.status_code >= 400:
            raise fail(f"{method} {path} failed with {response.status_code}: {_error_message(response)}")
        try:
            return response.json()
        except ValueError as exc:
            raise fail(f"{method} {path} returned {response.status_code} with a body that is not JSON; is {self.url} the manager API?") from exc

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=body, params=params or None)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def iter_sandboxes(self, page_size: int = PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """Yield every sandbox, following `limit`/`offset` pages until a short page."""
        offset = 0
        while True:
            page = self.get("/api/v1/sandboxes", limit=page_size, offset=offset)
            yield from page
            if len(page) < page_size:
                return
            offset += len(page)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:500] or response.reason_phrase


def secret_from_env(variable: str, what: str) -> str:
    """Read a secret from the environment variable the user named."""
    value = os.environ.get(variable)
    if not value:
        raise fail(f"environment variable {variable} named for the {what} is not set or empty; export it first", EXIT_USAGE)
    return value


def prompt_secret(what: str, option: str) -> str:
    """Prompt for a secret without echo. Outside a terminal, exit 2 and name the option that reads it from the environment."""
    if not os.isatty(0):
        raise fail(f"missing {what}: pass {option} VAR naming an environment variable that contains it", EXIT_USAGE)
    return typer.prompt(what.capitalize(), hide_input=True)
