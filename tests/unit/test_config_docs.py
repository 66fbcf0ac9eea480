"""The generated configuration reference: it matches the settings models and lists every field."""

from __future__ import annotations

import pathlib

from sandbox_backup import config_docs
from sandbox_backup.config import Settings
from sandbox_backup.runner.settings import RunnerSettings

DOCS_FILE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_committed_docs_up_to_date() -> None:
    assert DOCS_FILE.read_text(encoding="utf-8") == config_docs.render(), "docs/configuration.md is out of date. Run scripts/gen-config-docs to regenerate it."


def test_every_setting_listed() -> None:
    text = config_docs.render()

    for name in Settings.model_fields:
        assert f"| `{name}` | `SANDBOX_BACKUP_{name.upper()}` |" in text, name
    for name in RunnerSettings.model_fields:
        assert f"| `{name}` | `SANDBOX_BACKUP_RUNNER_{name.upper()}` |" in text, name


def test_rows_show_default_and_range() -> None:
    lines = config_docs.render().splitlines()

    api_port = next(line for line in lines if line.startswith("| `api_port` "))
    assert "| `8200` | >= 1, <= 65535 | Port of the manager API. |" in api_port
    token = next(line for line in lines if line.startswith("| `token` "))
    assert "| required |" in token
    backup_timeout = next(line for line in lines if line.startswith("| `backup_timeout_s` "))
    assert "| > 0 |" in backup_timeout


def test_check_mode(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "configuration.md"

    assert config_docs.main([str(path), "--check"]) == 1
    assert config_docs.main([str(path)]) == 0
    assert config_docs.main([str(path), "--check"]) == 0
    path.write_text(path.read_text() + "edited\n")
    assert config_docs.main([str(path), "--check"]) == 1
