"""Exceptions raised by sandbox-backup.

The hierarchy follows where a failure happens and whether trying again can help:

    SandboxBackupError
    ├── InvalidInput                  bad value from a caller; nothing was changed
    │   └── InvalidReference          a sandbox id or image reference outside the OCI grammar
    ├── NotFound                      a runner, registry, sandbox or backup id that does not exist
    ├── Conflict                      the request does not fit the current state
    ├── RegistryError
    │   ├── RegistryUnavailable       could not tell: timeout, connection error, 5xx (transient)
    │   ├── RegistryAuthError         401/403 after authenticating: could not tell (transient)
    │   └── RegistryProtocolError     the registry answered something that breaks the spec
    ├── RunnerError
    │   ├── RunnerUnavailable         connection error, timeout or 5xx (transient)
    │   ├── RunnerRejected            4xx: the runner refused the request (permanent unless busy)
    │   └── RunnerProtocolError       a malformed runner response (permanent)
    └── EngineError                   the container engine failed an operation on a runner

A `transient` attribute tells the retry policy whether another attempt can succeed.
"""

from __future__ import annotations


class SandboxBackupError(Exception):
    """Base class of every error sandbox-backup raises on purpose."""

    transient: bool = False


class InvalidInput(SandboxBackupError):
    """A caller passed a value that cannot be used; nothing was changed."""


class InvalidReference(InvalidInput):
    """A sandbox id, repository or tag that does not fit the OCI reference grammar."""


class NotFound(SandboxBackupError):
    """A runner, registry, sandbox or backup id that does not exist."""


class Conflict(SandboxBackupError):
    """The request does not fit the current state of the object it names."""


class RegistryError(SandboxBackupError):
    """A call to an OCI distribution registry failed."""

    def __init__(self, message: str, *, url: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code


class RegistryUnavailable(RegistryError):
    """The registry could not tell: timeout, connection error or a 5xx status."""

    transient = True


class RegistryAuthError(RegistryError):
    """The registry rejected the credentials (401 or 403), so whether the object exists is unknown."""

    transient = True


class RegistryProtocolError(RegistryError):
    """The registry returned a response the distribution specification does not allow."""


class RunnerError(SandboxBackupError):
    """A call to a runner agent failed."""

    def __init__(self, message: str, *, runner_id: str | None = None, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.runner_id = runner_id
        self.status_code = status_code
        # The `code` of the runner's error body, e.g. MANIFEST_UNKNOWN or BLOB_UNKNOWN on a failed pull.
        self.code = code


class RunnerUnavailable(RunnerError):
    """The runner did not respond: connection refused, timeout or a 5xx status."""

    transient = True


class RunnerRejected(RunnerError):
    """The runner answered 4xx: it refused the request as given."""


class RunnerProtocolError(RunnerError):
    """The runner answered with a body that does not match its API."""


class EngineError(SandboxBackupError):
    """The container engine failed an operation (commit, push, pull, create, remove)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ReportRejected(SandboxBackupError):
    """A runner call came with an unknown runner id or a token that is not that runner's."""
