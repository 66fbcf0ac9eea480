import datetime

import pytest

from sandbox_backup import errors
from sandbox_backup.domain import reference

NOW = datetime.datetime(2026, 12, 4, 20, 47, 21, 123456, tzinfo=datetime.timezone.utc)


def test_build_backup_reference_layout() -> None:
    built = reference.build_backup_reference("http://127.0.0.1:5000", "team", "sb-1", NOW)
    assert built == "127.0.0.1:5000/team/backup-sb-1:20261204T204721.123456Z"


def test_build_backup_reference_default_project() -> None:
    built = reference.build_backup_reference("https://registry.example.com/", None, "sb-1", NOW)
    assert built.startswith("registry.example.com/sandbox-backup/backup-sb-1:")


@pytest.mark.parametrize(
    "sandbox_id",
    [
        "Upper",  # uppercase is not allowed in a repository
        "ends-",  # must end with a letter or digit
        "-starts",
        "has space",
        "slash/inside",  # would add a path component
        "",
        "a" * 129,  # longer than the sandboxes.id column
        "unicodé",
        "trailing\n",
    ],
)
def test_invalid_sandbox_id_rejected(sandbox_id: str) -> None:
    with pytest.raises(errors.InvalidReference):
        reference.validate_sandbox_id(sandbox_id)


@pytest.mark.parametrize("sandbox_id", ["a", "sb-1", "a.b_c__d---e", "0" * 128])
def test_valid_sandbox_id_accepted(sandbox_id: str) -> None:
    assert reference.validate_sandbox_id(sandbox_id) == sandbox_id


def test_parse_reference_round_trip() -> None:
    parsed = reference.parse_reference("127.0.0.1:5000/team/backup-sb-1:20261204T204721.123456Z")
    assert parsed.host == "127.0.0.1:5000"
    assert parsed.repository == "team/backup-sb-1"
    assert parsed.tag == "20261204T204721.123456Z"
    assert str(parsed) == "127.0.0.1:5000/team/backup-sb-1:20261204T204721.123456Z"


@pytest.mark.parametrize(
    "text",
    [
        "no-host",  # a bare name has no registry host
        "host:5000/Bad/Repo:tag",
        "host:5000/repo:-tag",
        "host:5000/repo@sha256",
        "host:5000/repo\n:tag",
    ],
)
def test_parse_reference_rejects_invalid(text: str) -> None:
    with pytest.raises(errors.InvalidReference):
        reference.parse_reference(text)


def test_registry_host_rejects_path() -> None:
    with pytest.raises(errors.InvalidInput):
        reference.registry_host("http://127.0.0.1:5000/v2/")
