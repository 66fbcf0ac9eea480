import pytest

from sandbox_backup.runner.settings import RunnerSettings


def test_runner_settings_from_toml_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "runner.toml"
    config.write_text('token = "from-the-file-123"\nport = 8400\nbackup_timeout_s = 120\n')
    monkeypatch.setenv("SANDBOX_BACKUP_RUNNER_CONFIG_FILE", str(config))
    monkeypatch.setenv("SANDBOX_BACKUP_RUNNER_PORT", "8500")

    settings = RunnerSettings()

    assert settings.token.get_secret_value() == "from-the-file-123"
    assert settings.backup_timeout_s == 120
    assert settings.port == 8500  # the environment wins over the file


def test_runner_settings_file_value_out_of_range(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "runner.toml"
    config.write_text('token = "t0k3n-from-file"\nport = 70000\n')
    monkeypatch.setenv("SANDBOX_BACKUP_RUNNER_CONFIG_FILE", str(config))

    with pytest.raises(ValueError, match="port"):
        RunnerSettings()
