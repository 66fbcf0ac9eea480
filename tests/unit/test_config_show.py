"""`sandbox-backup config show` and `describe_settings`: values, sources, masking and invalid values."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from typer.testing import CliRunner

from sandbox_backup.cli.main import app
from sandbox_backup.config import CONFIG_FILE_ENV, ENV_PREFIX, MASK, ConfigError, Settings, describe_settings

ADMIN_SECRET = "admin-secret-value"
READ_SECRET = "read-secret-value"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop every SANDBOX_BACKUP_* variable of the calling shell, so each test sets its own."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _write_config(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, text: str) -> pathlib.Path:
    path = tmp_path / "manager.toml"
    path.write_text(text)
    monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
    return path


def _views() -> dict[str, object]:
    return {view.name: view for view in describe_settings()}


def _show_json() -> list[dict[str, object]]:
    result = CliRunner().invoke(app, ["config", "show", "--output", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_lists_every_setting() -> None:
    names = [view.name for view in describe_settings()]

    assert names == list(Settings.model_fields)


def test_default_source() -> None:
    view = _views()["api_port"]

    assert view.source == "default"
    assert view.value == 8200
    assert view.env_name == "SANDBOX_BACKUP_API_PORT"


def test_env_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKUP_API_PORT", "9100")

    view = _views()["api_port"]

    assert view.source == "env"
    assert view.value == 9100


def test_env_source_lowercase_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings matches names case-insensitively, so the source must too.
    monkeypatch.setenv("sandbox_backup_retry_jitter", "0.5")

    view = _views()["retry_jitter"]

    assert view.source == "env"
    assert view.value == 0.5


def test_file_source(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(tmp_path, monkeypatch, 'api_port = 9000\nlog_level = "debug"\n')

    views = _views()

    assert views["api_port"].source == "file"
    assert views["api_port"].value == 9000
    assert views["log_level"].source == "file"
    assert views["log_level"].value == "DEBUG"
    assert views["api_host"].source == "default"


def test_env_over_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(tmp_path, monkeypatch, "api_port = 9000\nretry_jitter = 0.5\n")
    monkeypatch.setenv("SANDBOX_BACKUP_API_PORT", "9100")

    views = _views()

    assert views["api_port"].source == "env"
    assert views["api_port"].value == 9100
    assert views["retry_jitter"].source == "file"


def test_secrets_masked_in_json(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKUP_API_TOKEN", ADMIN_SECRET)
    _write_config(tmp_path, monkeypatch, f'api_read_token = "{READ_SECRET}"\n')

    result = CliRunner().invoke(app, ["config", "show", "--output", "json"])

    assert result.exit_code == 0, result.output
    assert ADMIN_SECRET not in result.output
    assert READ_SECRET not in result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["api_token"] == {"name": "api_token", "env_name": "SANDBOX_BACKUP_API_TOKEN", "value": MASK, "source": "env", "secret": True}
    assert rows["api_read_token"]["value"] == MASK
    assert rows["api_read_token"]["source"] == "file"
    assert rows["api_port"]["secret"] is False


def test_unset_secret_shows_none() -> None:
    rows = {row["name"]: row for row in _show_json()}

    assert rows["api_token"]["value"] is None
    assert rows["api_read_token"]["value"] is None


def test_url_passwords_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKUP_DATABASE_URL", "postgresql://backup:db-secret@127.0.0.1:5432/backup")
    monkeypatch.setenv("SANDBOX_BACKUP_COORDINATION_URL", "redis://:redis-secret@127.0.0.1:6379/0")

    result = CliRunner().invoke(app, ["config", "show", "--output", "json"])

    assert result.exit_code == 0, result.output
    assert "db-secret" not in result.output
    assert "redis-secret" not in result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["database_url"]["value"] == f"postgresql://backup:{MASK}@127.0.0.1:5432/backup"
    assert rows["coordination_url"]["value"] == f"redis://:{MASK}@127.0.0.1:6379/0"


def test_table_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKUP_API_TOKEN", ADMIN_SECRET)
    monkeypatch.setenv("COLUMNS", "200")

    result = CliRunner().invoke(app, ["config", "show"])

    assert result.exit_code == 0, result.output
    assert ADMIN_SECRET not in result.output
    api_token_line = next(line for line in result.output.splitlines() if " api_token " in line)
    assert MASK in api_token_line
    assert "env" in api_token_line
    api_port_line = next(line for line in result.output.splitlines() if " api_port " in line)
    assert "8200" in api_port_line
    assert "default" in api_port_line


@pytest.mark.parametrize("source", ["env", "file"])
def test_out_of_range_exits_2(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    if source == "env":
        monkeypatch.setenv("SANDBOX_BACKUP_API_PORT", "70000")
    else:
        _write_config(tmp_path, monkeypatch, "api_port = 70000\n")

    result = CliRunner().invoke(app, ["config", "show"])

    assert result.exit_code == 2
    assert "SANDBOX_BACKUP_API_PORT (api_port)" in result.stderr
    assert "less than or equal to 65535" in result.stderr


def test_invalid_toml_exits_2(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_config(tmp_path, monkeypatch, "api_port = \n")

    result = CliRunner().invoke(app, ["config", "show"])

    assert result.exit_code == 2
    assert str(path) in result.stderr
    assert "invalid TOML" in result.stderr


def test_missing_file_warns(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "absent.toml"))

    result = CliRunner().invoke(app, ["config", "show", "--output", "json"])

    assert result.exit_code == 0, result.output
    assert "absent.toml" in result.stderr
    assert all(row["source"] == "default" for row in json.loads(result.stdout))


def test_describe_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKUP_RETRY_JITTER", "2")

    with pytest.raises(ConfigError, match="SANDBOX_BACKUP_RETRY_JITTER"):
        describe_settings()
