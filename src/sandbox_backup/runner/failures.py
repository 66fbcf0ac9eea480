"""Classification of engine and registry failures: what went wrong, and can a retry help.

Podman and Docker report push and pull failures as free text inside the progress stream,
for example "unauthorized: authentication required" or "manifest unknown". The
classification therefore matches the error codes of the OCI distribution specification
and the Go network error texts that containers/image and the Docker daemon put in them.
"""

from __future__ import annotations

import enum

from sandbox_backup import errors


class FailureKind(str, enum.Enum):
    AUTH_DENIED = "REGISTRY_AUTH_DENIED"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    REGISTRY_UNREACHABLE = "REGISTRY_UNREACHABLE"
    TIMED_OUT = "TIMED_OUT"
    REGISTRY_SERVER_ERROR = "REGISTRY_SERVER_ERROR"
    CONTAINER_NOT_FOUND = "CONTAINER_NOT_FOUND"
    UNKNOWN = "UNKNOWN"


TRANSIENT_KINDS = frozenset(
    {
        FailureKind.REGISTRY_UNREACHABLE,
        FailureKind.TIMED_OUT,
        FailureKind.REGISTRY_SERVER_ERROR,
        FailureKind.UNKNOWN,
    }
)

# Checked in this order, and the first kind with a matching fragment wins. Auth comes
# first because an "unauthorized" message also names the blob or manifest being read.
# Status numbers alone are not matched, because digests in the messages contain digits.
_FRAGMENTS: tuple[tuple[FailureKind, tuple[str, ...]], ...] = (
    (
        FailureKind.AUTH_DENIED,
        ("unauthorized", "authentication required", "denied", "forbidden"),
    ),
    (FailureKind.MANIFEST_UNKNOWN, ("manifest unknown", "name unknown")),
    (FailureKind.BLOB_UNKNOWN, ("blob unknown", "fetching blob: invalid status code from registry 404")),
    (FailureKind.NAME_INVALID, ("name invalid", "tag invalid", "invalid reference format", "manifest invalid")),
    (FailureKind.TIMED_OUT, ("timeout", "timed out", "deadline exceeded")),
    (
        FailureKind.REGISTRY_UNREACHABLE,
        (
            "connection refused",
            "connection reset",
            "no such host",
            "network is unreachable",
            "pinging container registry",
            "eof",
            "broken pipe",
        ),
    ),
    (
        FailureKind.REGISTRY_SERVER_ERROR,
        ("internal server error", "bad gateway", "service unavailable", "toomanyrequests", "too many requests"),
    ),
)


def classify_registry_message(message: str) -> FailureKind:
    """Return the failure kind named in a push or pull error message; UNKNOWN if none matches.

    UNKNOWN counts as transient: the manager's retry limit ends a loop on an error that
    this table does not know, while a wrong "permanent" would drop a backup for good.
    """
    text = message.lower()
    for kind, fragments in _FRAGMENTS:
        if any(fragment in text for fragment in fragments):
            return kind
    return FailureKind.UNKNOWN


class RegistryTransferError(errors.EngineError):
    """A push or pull failed. `kind` is the reason, and `transient` whether a retry can help."""

    def __init__(self, message: str, *, kind: FailureKind) -> None:
        super().__init__(message, transient=kind in TRANSIENT_KINDS)
        self.kind = kind


class ContainerNotFound(errors.NotFound):
    """The engine has no container managed by this runner under the sandbox id."""
