"""Reading engine push and pull streams, and classifying registry failures."""

from __future__ import annotations

import pytest

from sandbox_backup.runner.failures import FailureKind, RegistryTransferError, classify_registry_message
from sandbox_backup.runner.push_stream import StreamAbort, decode_stream, read_pull_stream, read_push_stream

DIGEST = "sha256:" + "ab" * 32
REFERENCE = "127.0.0.1:5000/p/backup-sb-1:t1"


def test_podman_status_line_gives_digest() -> None:
    items = [
        {"status": "The push refers to repository [127.0.0.1:5000/p/backup-sb-1:t1]"},
        {"status": f"t1: digest: {DIGEST} size: 579"},
    ]

    assert read_push_stream(items, REFERENCE) == DIGEST


def test_docker_aux_item_gives_digest() -> None:
    items = [{"status": "Pushed", "id": "abc"}, {"aux": {"Tag": "t1", "Digest": DIGEST, "Size": 525}}]

    assert read_push_stream(items, REFERENCE) == DIGEST


def test_stream_without_digest_returns_none() -> None:
    assert read_push_stream([{"status": "Pushed"}], REFERENCE) is None


def test_error_item_raises_with_kind() -> None:
    message = "trying to reuse blob sha256:90ee at destination: unauthorized: authentication required"
    items = [
        {"status": "start"},
        {"errorDetail": {"message": message}, "error": message},
        {"status": f"digest: {DIGEST}"},
    ]

    with pytest.raises(RegistryTransferError) as raised:
        read_push_stream(items, REFERENCE)

    assert raised.value.kind is FailureKind.AUTH_DENIED
    assert raised.value.transient is False
    assert REFERENCE in str(raised.value)


def test_pull_error_item_raises() -> None:
    with pytest.raises(RegistryTransferError) as raised:
        read_pull_stream([{"error": "reading manifest t1: manifest unknown: manifest unknown"}], REFERENCE)

    assert raised.value.kind is FailureKind.MANIFEST_UNKNOWN


def test_decode_stream_skips_blank_lines_and_rejects_garbage() -> None:
    lines = [b'{"status": "a"}', b"", b"  ", b'{"status": "b"}']
    assert list(decode_stream(lines)) == [{"status": "a"}, {"status": "b"}]
    with pytest.raises(RegistryTransferError, match="not JSON"):
        list(decode_stream([b"<html>"]))


@pytest.mark.parametrize(
    ("message", "kind", "transient"),
    [
        ("reading manifest x in h/r: unauthorized: authentication required", FailureKind.AUTH_DENIED, False),
        ("requested access to the resource is denied", FailureKind.AUTH_DENIED, False),
        ("reading manifest nope in h/r: manifest unknown: manifest unknown", FailureKind.MANIFEST_UNKNOWN, False),
        (
            "reading blob sha256:5966: Error fetching blob: invalid status code from registry 404 (Not Found)",
            FailureKind.BLOB_UNKNOWN,
            False,
        ),
        ("blob unknown: blob unknown to registry", FailureKind.BLOB_UNKNOWN, False),
        ("invalid reference format", FailureKind.NAME_INVALID, False),
        (
            'pinging container registry 127.0.0.1:1: Get "https://127.0.0.1:1/v2/": '
            "dial tcp: connect: connection refused",
            FailureKind.REGISTRY_UNREACHABLE,
            True,
        ),
        (
            "reading blob sha256:4013abc: Get http://h/v2/: connection reset by peer",
            FailureKind.REGISTRY_UNREACHABLE,
            True,
        ),
        ("net/http: TLS handshake timeout", FailureKind.TIMED_OUT, True),
        ("received unexpected HTTP status: 503 Service Unavailable", FailureKind.REGISTRY_SERVER_ERROR, True),
        ("something nobody has seen", FailureKind.UNKNOWN, True),
    ],
)
def test_registry_messages_are_classified(message: str, kind: FailureKind, transient: bool) -> None:
    assert classify_registry_message(message) is kind
    assert RegistryTransferError(message, kind=kind).transient is transient


def test_abort_before_attach_is_kept() -> None:
    abort = StreamAbort()

    abort.abort()

    assert abort.aborted is True
