"""JSON bodies of the runner API, shared by the agent (runner.app) and the manager's client.

Field names follow the Daytona runner API (Swagger 2.0, v0): Python attributes are
snake_case and the JSON names are their camelCase aliases. `backupDigest`,
`backupSizeBytes`, `backupLayerCount` and the report body are sandbox-backup's own additions.
"""

from __future__ import annotations

import enum
from typing import Any

import pydantic
from pydantic.alias_generators import to_camel


class _CamelModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def to_json_dict(self) -> dict[str, Any]:
        """Return the JSON body with camelCase names and without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class RunnerSandboxState(str, enum.Enum):
    """Sandbox state as the Daytona runner API spells it."""

    CREATING = "creating"
    RESTORING = "restoring"
    DESTROYED = "destroyed"
    DESTROYING = "destroying"
    STARTED = "started"
    STOPPED = "stopped"
    STARTING = "starting"
    STOPPING = "stopping"
    RESIZING = "resizing"
    ERROR = "error"
    UNKNOWN = "unknown"
    PULLING_SNAPSHOT = "pulling_snapshot"


class RunnerBackupState(str, enum.Enum):
    """Backup state of a sandbox as the Daytona runner API spells it."""

    NONE = "NONE"
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class RegistryCredentials(_CamelModel):
    """Registry that a backup is pushed to or a snapshot is pulled from (Daytona's RegistryDTO)."""

    url: str
    project: str | None = None
    username: str | None = None
    password: pydantic.SecretStr | None = None

    def to_request_body(self) -> dict[str, Any]:
        """Return the JSON body with the real password: only for the HTTP request to a runner."""
        body = self.to_json_dict()
        if self.password is not None:
            body["password"] = self.password.get_secret_value()
        return body

    def auth_config(self) -> dict[str, str] | None:
        """Return docker-py's `auth_config`, or None when the registry needs no login."""
        if not self.username:
            return None
        password = self.password.get_secret_value() if self.password else ""
        return {"username": self.username, "password": password}


class CreateBackupRequest(_CamelModel):
    """Body of `POST /sandboxes/{sandboxId}/backup`."""

    registry: RegistryCredentials
    snapshot: str

    def to_request_body(self) -> dict[str, Any]:
        return {"registry": self.registry.to_request_body(), "snapshot": self.snapshot}


class CreateSandboxRequest(_CamelModel):
    """Body of `POST /sandboxes` (Daytona's CreateSandboxDTO; fields not listed here are ignored)."""

    model_config = pydantic.ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    id: str
    os_user: str
    snapshot: str
    user_id: str
    registry: RegistryCredentials | None = None
    skip_start: bool = False
    entrypoint: list[str] | None = None
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    name: str | None = None
    organization_id: str | None = None
    region_id: str | None = None

    def to_request_body(self) -> dict[str, Any]:
        body = self.to_json_dict()
        if self.registry is not None:
            body["registry"] = self.registry.to_request_body()
        return body


class CreateSandboxResponse(_CamelModel):
    """Body of a 201 response to `POST /sandboxes`."""

    daemon_version: str


class SandboxInfo(_CamelModel):
    """Body of `GET /sandboxes/{sandboxId}`: the container state and the sandbox's backup state."""

    state: RunnerSandboxState
    backup_state: RunnerBackupState
    backup_snapshot: str | None = None
    backup_error: str | None = None
    recoverable: bool = False
    daemon_version: str | None = None
    backup_digest: str | None = None
    backup_size_bytes: int | None = None
    # Number of layers of the pushed image, set for a COMPLETED backup.
    backup_layer_count: int | None = None


class ErrorResponse(_CamelModel):
    """Body of every error response of the runner API."""

    message: str
    path: str
    status_code: int
    timestamp: str
    code: str | None = None
    method: str | None = None


class BackupReport(_CamelModel):
    """Body that the agent posts to `{manager_url}/api/v1/runners/{runner_id}/reports`."""

    sandbox_id: str
    snapshot: str
    state: RunnerBackupState
    digest: str | None = None
    size_bytes: int | None = None
    error: str | None = None
    recoverable: bool = False
    # Number of layers of the pushed image, set for a COMPLETED backup.
    layer_count: int | None = None


class ManagedSandbox(_CamelModel):
    """One entry of `GET /agent/sandboxes`."""

    id: str
    state: RunnerSandboxState
    backup_state: RunnerBackupState
    backup_snapshot: str | None = None


class AgentHealth(_CamelModel):
    """Body of `GET /agent/health`."""

    status: str
    engine_reachable: bool
    engine_version: str | None = None
    runner_id: str
