"""JSON bodies of the manager's REST API (camelCase on the wire)."""

from __future__ import annotations

import datetime
from typing import Annotated

import pydantic
from pydantic.alias_generators import to_camel

from sandbox_backup.domain.states import BackupState, BackupTrigger, RunnerState, SandboxBackupState, SandboxState
from sandbox_backup.manager.lifecycle import LifecycleEvent


def _text(max_length: int, *, min_length: int = 0) -> object:
    # No NUL characters: PostgreSQL cannot store them in text columns.
    return pydantic.StringConstraints(min_length=min_length, max_length=max_length, pattern=r"^[^\x00]*$")


Name = Annotated[str, _text(128, min_length=1)]
ShortText = Annotated[str, _text(255)]
Secret = Annotated[pydantic.SecretStr, pydantic.Field(min_length=8, max_length=1024)]


class ApiModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True, extra="forbid")


class RunnerIn(ApiModel):
    api_url: pydantic.AnyHttpUrl = pydantic.Field(max_length=1024, description="Base URL of the runner agent, e.g. http://10.0.0.5:8300.")
    token: Secret = pydantic.Field(description="Bearer token of the runner agent (8 to 1024 characters); also authenticates its reports.")
    state: RunnerState = RunnerState.READY
    region: Name | None = None
    capacity: int = pydantic.Field(100, ge=0, le=100_000)
    max_concurrent_backups: int | None = pydantic.Field(None, ge=1, le=1000, description="Cap of backups in flight on this runner; empty uses the manager default.")


class RunnerOut(ApiModel):
    id: str
    api_url: str
    state: RunnerState
    region: str | None
    capacity: int
    max_concurrent_backups: int | None
    last_seen_at: datetime.datetime | None


class RegistryIn(ApiModel):
    url: pydantic.AnyHttpUrl = pydantic.Field(max_length=1024, description="Registry base URL, e.g. https://registry.example.com, without credentials or path.")
    project: ShortText | None = pydantic.Field(None, description="Path prefix of backup repositories; default sandbox-backup.")
    username: ShortText | None = None
    password: Annotated[pydantic.SecretStr, pydantic.Field(max_length=1024)] | None = pydantic.Field(None, description="Write-only: never returned.")
    region: Name | None = None
    organization_id: Name | None = None
    is_default: bool = False


class RegistryOut(ApiModel):
    id: str
    url: str
    project: str | None
    username: str | None
    region: str | None
    organization_id: str | None
    is_default: bool


class SandboxIn(ApiModel):
    state: SandboxState
    runner_id: Name | None = None
    organization_id: Annotated[str, _text(128)] | None = pydantic.Field(None, description="Empty for a warm-pool sandbox, which is never backed up.")
    region: Name | None = None
    desired_state: SandboxState | None = None
    ephemeral: bool = False

    @pydantic.field_validator("organization_id")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


class SandboxBatchItem(SandboxIn):
    id: Name


class SandboxBatchIn(ApiModel):
    sandboxes: list[SandboxBatchItem] = pydantic.Field(max_length=1000, description="Up to 1000 sandboxes, each listed once.")


class SandboxBatchOut(ApiModel):
    recorded: int
    created: int
    backups_queued: int


class SandboxOut(ApiModel):
    id: str
    organization_id: str | None
    runner_id: str | None
    region: str | None
    state: SandboxState
    desired_state: SandboxState | None
    backup_state: SandboxBackupState
    current_backup_id: str | None
    backup_registry_id: str | None
    last_backup_at: datetime.datetime | None
    error_reason: str | None
    ephemeral: bool
    owed_deletions: int = pydantic.Field(0, description="Registry deletions still owed for this sandbox's backups.")


class EventIn(ApiModel):
    type: LifecycleEvent


class BackupOut(ApiModel):
    id: str
    sandbox_id: str
    runner_id: str | None
    registry_id: str
    image_ref: str
    manifest_digest: str | None
    size_bytes: int | None
    state: BackupState
    trigger: BackupTrigger
    attempt: int
    next_attempt_at: datetime.datetime
    error_reason: str | None
    created_at: datetime.datetime
    started_at: datetime.datetime | None
    completed_at: datetime.datetime | None
    verified_at: datetime.datetime | None
    broken_at: datetime.datetime | None = None
    broken_reason: str | None = None
    deleted_at: datetime.datetime | None = None
    layer_count: int | None = None


class SandboxPruneOut(ApiModel):
    sandbox_id: str
    deleted: list[str]
    kept: dict[str, list[str]] = pydantic.Field(description="Kept backup ids with the rules that keep each one.")
    error: str | None = None


class PruneOut(ApiModel):
    dry_run: bool
    pruned: int
    sandboxes: list[SandboxPruneOut]


class VerifyOut(ApiModel):
    outcome: str
    backup: BackupOut


class RetentionPolicyIO(ApiModel):
    """Counts kept per rule; fields left out take the global default."""

    model_config = pydantic.ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    keep_last: int | None = pydantic.Field(None, ge=0, le=100_000)
    keep_hourly: int | None = pydantic.Field(None, ge=0, le=100_000)
    keep_daily: int | None = pydantic.Field(None, ge=0, le=100_000)
    keep_weekly: int | None = pydantic.Field(None, ge=0, le=100_000)
    keep_monthly: int | None = pydantic.Field(None, ge=0, le=100_000)
    min_verified: int | None = pydantic.Field(None, ge=0, le=100_000, description="Never delete the newest N verified backups.")


class RestoreIn(ApiModel):
    backup_id: Name | None = pydantic.Field(None, description="Restore this backup only; empty tries the newest verified first.")
    runner_id: Name | None = pydantic.Field(None, description="Restore onto this READY runner; empty chooses one.")


class RestoreOut(ApiModel):
    id: str
    sandbox_id: str
    purpose: str
    state: str
    requested_backup_id: str | None
    requested_runner_id: str | None
    backup_id: str | None
    runner_id: str | None
    previous_runner_id: str | None
    target_sandbox_id: str
    registry_attempts: int
    error_reason: str | None
    created_at: datetime.datetime
    completed_at: datetime.datetime | None


class DrainOut(ApiModel):
    runner_id: str
    state: RunnerState
    drain_started_at: str | None
    sandboxes: int
    backed_up: int
    moving: int
    remaining: int


class ReportOut(ApiModel):
    accepted: bool


class ErrorBody(ApiModel):
    code: str
    message: str


class ErrorOut(ApiModel):
    error: ErrorBody
