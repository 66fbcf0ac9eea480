"""Parsing of WWW-Authenticate challenges."""

from __future__ import annotations

import pytest

from sandbox_backup import errors
from sandbox_backup.registry.auth import Challenge, RegistryAuth, parse_challenges


def test_bearer_challenge_params() -> None:
    header = 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'

    assert parse_challenges([header]) == [
        Challenge(
            "bearer",
            {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull"},
        )
    ]


def test_basic_challenge_scheme_is_lowercased() -> None:
    assert parse_challenges(['BASIC realm="Registry Realm"']) == [Challenge("basic", {"realm": "Registry Realm"})]


def test_two_challenges_in_one_value() -> None:
    challenges = parse_challenges(['Basic realm="r", Bearer realm="https://a/token", service="s"'])

    assert [challenge.scheme for challenge in challenges] == ["basic", "bearer"]
    assert challenges[1].params == {"realm": "https://a/token", "service": "s"}


def test_challenges_from_several_headers() -> None:
    challenges = parse_challenges(['Basic realm="r"', 'Bearer realm="https://a/token"'])

    assert [challenge.scheme for challenge in challenges] == ["basic", "bearer"]


def test_quoted_value_with_comma_and_escape() -> None:
    challenges = parse_challenges([r'Bearer realm="https://a/token",scope="repository:a:pull,push",error="say \"hi\""'])

    assert challenges[0].params["scope"] == "repository:a:pull,push"
    assert challenges[0].params["error"] == 'say "hi"'


def test_unquoted_param_value() -> None:
    assert parse_challenges(["Basic realm=registry"]) == [Challenge("basic", {"realm": "registry"})]


def test_unparsable_rest_keeps_earlier_challenges() -> None:
    challenges = parse_challenges(['Basic realm="r", Negotiate abc==='])

    assert challenges[0] == Challenge("basic", {"realm": "r"})


@pytest.mark.parametrize("header", ["", "   ", ",", '"quoted"'])
def test_empty_or_garbage_header_has_no_challenge(header: str) -> None:
    assert parse_challenges([header]) == []


def test_username_without_password_is_rejected() -> None:
    with pytest.raises(errors.InvalidInput):
        RegistryAuth("backup", None)


def test_repr_hides_password() -> None:
    assert "secret" not in repr(RegistryAuth("backup", "secret"))
