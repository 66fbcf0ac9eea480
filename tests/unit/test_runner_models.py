"""Runner API bodies, settings, snapshot checks and container state mapping."""

from __future__ import annotations

import json
import pathlib

import pydantic
import pytest

from sandbox_backup import errors
from sandbox_backup.runner.container_state import sandbox_state
from sandbox_backup.runner.models import (
    BackupReport,
    CreateSandboxRequest,
    RegistryCredentials,
    RunnerBackupState,
    RunnerSandboxState,
    SandboxInfo,
)
from sandbox_backup.runner.settings import RunnerSettings
from sandbox_backup.runner.snapshot_target import validate_snapshot_target


def test_registry_password_is_hidden_except_in_request_body() -> None:
    registry = RegistryCredentials(url="http://127.0.0.1:5000", username="u", password="pw-secret")

    assert "pw-secret" not in repr(registry)
    assert "pw-secret" not in registry.model_dump_json()
    assert "pw-secret" not in json.dumps(registry.to_json_dict())
    assert registry.to_request_body()["password"] == "pw-secret"
    assert registry.auth_config() == {"username": "u", "password": "pw-secret"}


def test_registry_without_username_has_no_auth_config() -> None:
    assert RegistryCredentials(url="http://127.0.0.1:5000").auth_config() is None


def test_create_request_ignores_unknown_fields() -> None:
    body = {
        "id": "sb-1",
        "osUser": "daytona",
        "snapshot": "127.0.0.1:5000/p/x:t",
        "userId": "user-1",
        "skipStart": True,
        "organizationId": "org-1",
        "cpuQuota": 2,
        "networkBlockAll": True,
    }

    request = CreateSandboxRequest.model_validate(body)

    assert (request.os_user, request.skip_start, request.organization_id) == ("daytona", True, "org-1")
    assert request.to_request_body() == {
        "id": "sb-1",
        "osUser": "daytona",
        "snapshot": "127.0.0.1:5000/p/x:t",
        "userId": "user-1",
        "skipStart": True,
        "organizationId": "org-1",
    }


def test_sandbox_info_rejects_unknown_states() -> None:
    with pytest.raises(pydantic.ValidationError):
        SandboxInfo.model_validate({"state": "started", "backupState": "ERROR"})
    with pytest.raises(pydantic.ValidationError):
        SandboxInfo.model_validate({"state": "paused", "backupState": "NONE"})


def test_backup_report_uses_camel_case() -> None:
    report = BackupReport(sandbox_id="sb-1", snapshot="h:1/r:t", state=RunnerBackupState.COMPLETED, size_bytes=3)

    assert report.to_json_dict() == {
        "sandboxId": "sb-1",
        "snapshot": "h:1/r:t",
        "state": "COMPLETED",
        "sizeBytes": 3,
        "recoverable": False,
    }


def test_settings_read_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKUP_RUNNER_TOKEN", "env-token")
    monkeypatch.setenv("SANDBOX_BACKUP_RUNNER_PORT", "9001")
    monkeypatch.setenv("SANDBOX_BACKUP_RUNNER_PAUSE_ON_COMMIT", "false")

    settings = RunnerSettings()

    assert settings.token.get_secret_value() == "env-token"
    assert "env-token" not in repr(settings)
    assert (settings.port, settings.pause_on_commit) == (9001, False)
    assert (settings.host, settings.backup_timeout_s, settings.manager_url) == ("127.0.0.1", 3600.0, None)
    assert settings.docker_host == "unix:///var/run/docker.sock"
    assert settings.container_label == "sandbox-backup.managed"
    assert isinstance(settings.state_path, pathlib.Path)


def test_settings_require_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_BACKUP_RUNNER_TOKEN", raising=False)

    with pytest.raises(pydantic.ValidationError, match="token"):
        RunnerSettings()


def test_snapshot_on_registry_host_is_accepted() -> None:
    reference = validate_snapshot_target("127.0.0.1:5000/p/backup-sb-1:t1", "http://127.0.0.1:5000/", for_push=True)

    assert (reference.host, reference.repository, reference.tag) == ("127.0.0.1:5000", "p/backup-sb-1", "t1")


@pytest.mark.parametrize(
    ("snapshot", "registry_url", "for_push", "error"),
    [
        ("127.0.0.1:5001/p/x:t", "http://127.0.0.1:5000", True, errors.InvalidInput),
        ("evil.example/p/x:t", "https://registry.example", False, errors.InvalidInput),
        ("127.0.0.1:5000/p/x", "http://127.0.0.1:5000", True, errors.InvalidReference),
        ("127.0.0.1:5000/p/x:t@sha256:" + "0" * 64, "http://127.0.0.1:5000", True, errors.InvalidReference),
        ("x:t", "http://127.0.0.1:5000", False, errors.InvalidReference),
        ("127.0.0.1:5000/p/x:t", "http://127.0.0.1:5000/some/path", False, errors.InvalidInput),
    ],
)
def test_snapshot_target_is_checked(snapshot: str, registry_url: str, for_push: bool, error: type[Exception]) -> None:
    with pytest.raises(error):
        validate_snapshot_target(snapshot, registry_url, for_push=for_push)


@pytest.mark.parametrize(
    ("status", "exit_code", "state"),
    [
        ("running", 0, RunnerSandboxState.STARTED),
        ("paused", 0, RunnerSandboxState.STARTED),
        ("created", 0, RunnerSandboxState.STOPPED),
        ("exited", 0, RunnerSandboxState.STOPPED),
        ("exited", 137, RunnerSandboxState.STOPPED),
        ("exited", 1, RunnerSandboxState.ERROR),
        ("removing", 0, RunnerSandboxState.DESTROYING),
        ("restarting", 0, RunnerSandboxState.STARTING),
        ("dead", 0, RunnerSandboxState.ERROR),
        ("something-new", None, RunnerSandboxState.UNKNOWN),
    ],
)
def test_container_status_maps_to_sandbox_state(status: str, exit_code: int | None, state: RunnerSandboxState) -> None:
    assert sandbox_state(status, exit_code) is state
