"""Tables of the manager's database (SQLAlchemy 2 declarative models).

Every row that changes state carries a `version` column; writers update it with a guarded
`UPDATE ... WHERE id = :id AND state = :expected AND version = :version` so that a lost race
changes nothing (see `store.guards`).
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from sqlalchemy import orm

from sandbox_backup.domain.states import BackupState, BackupTrigger, RunnerState, SandboxBackupState, SandboxState


class UTCDateTime(sa.types.TypeDecorator[datetime.datetime]):
    """Aware UTC datetimes on every backend (SQLite drops the time zone otherwise)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None, dialect: sa.Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} would be stored without a time zone; pass an aware UTC datetime")
        value = value.astimezone(datetime.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime.datetime | None, dialect: sa.Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc)


def _enum(enum_cls: type) -> sa.Enum:
    # Stored as plain strings with a CHECK-free VARCHAR, so adding a state needs no type migration.
    return sa.Enum(enum_cls, native_enum=False, create_constraint=False, length=32, validate_strings=True)


class Base(orm.DeclarativeBase):
    pass


class Runner(Base):
    __tablename__ = "runners"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(128), primary_key=True)
    api_url: orm.Mapped[str] = orm.mapped_column(sa.String(1024))
    token: orm.Mapped[str] = orm.mapped_column(sa.String(1024))
    state: orm.Mapped[RunnerState] = orm.mapped_column(_enum(RunnerState), default=RunnerState.READY)
    region: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    capacity: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=100)
    max_concurrent_backups: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    failed_probes: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    # When the runner last entered DRAINING; backups dispatched after it count as fresh.
    drain_started_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    last_seen_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    created_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    updated_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    version: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=1)


class Registry(Base):
    __tablename__ = "registries"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(128), primary_key=True)
    url: orm.Mapped[str] = orm.mapped_column(sa.String(1024))
    project: orm.Mapped[str | None] = orm.mapped_column(sa.String(255))
    username: orm.Mapped[str | None] = orm.mapped_column(sa.String(255))
    password: orm.Mapped[str | None] = orm.mapped_column(sa.String(1024))
    region: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    organization_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    is_default: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, default=False)
    created_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    updated_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)


class Sandbox(Base):
    __tablename__ = "sandboxes"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(128), primary_key=True)
    # A sandbox without an organization sits in a warm pool and is never backed up.
    organization_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    runner_id: orm.Mapped[str | None] = orm.mapped_column(sa.ForeignKey("runners.id"), index=True)
    region: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    state: orm.Mapped[SandboxState] = orm.mapped_column(_enum(SandboxState))
    desired_state: orm.Mapped[SandboxState | None] = orm.mapped_column(_enum(SandboxState))
    # When `state` last changed: a stopped sandbox needs a backup requested after this moment.
    state_changed_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    backup_state: orm.Mapped[SandboxBackupState] = orm.mapped_column(_enum(SandboxBackupState), default=SandboxBackupState.NONE, index=True)
    current_backup_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(36))
    backup_registry_id: orm.Mapped[str | None] = orm.mapped_column(sa.ForeignKey("registries.id"))
    # Completion and dispatch time of the newest COMPLETED attempt; a stopped sandbox is covered
    # only by a backup dispatched after it stopped.
    last_backup_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    last_backup_started_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    last_attempt_ended_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    error_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    ephemeral: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, default=False)
    # Retention policy of this sandbox as JSON (see domain.retention.RetentionPolicy); empty uses the global default.
    retention_policy: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    created_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    updated_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    version: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=1)

    __table_args__ = (sa.Index("ix_sandboxes_state_runner", "state", "runner_id"),)


class Backup(Base):
    """One backup attempt. A retry is a new row with `attempt` one higher."""

    __tablename__ = "backups"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(36), primary_key=True)
    sandbox_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("sandboxes.id"))
    # PENDING: the runner the sandbox is on, kept in step when it moves (dispatch reads PENDING
    # attempts by runner). From dispatch on: the runner the attempt was sent to.
    runner_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    registry_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("registries.id"))
    image_ref: orm.Mapped[str] = orm.mapped_column(sa.String(1024))
    trigger: orm.Mapped[BackupTrigger] = orm.mapped_column(_enum(BackupTrigger))
    state: orm.Mapped[BackupState] = orm.mapped_column(_enum(BackupState))
    attempt: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=1)
    next_attempt_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    manifest_digest: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    size_bytes: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger)
    error_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    error_transient: orm.Mapped[bool | None] = orm.mapped_column(sa.Boolean)
    created_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    started_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    accepted_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    checked_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    completed_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    verified_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    # Set when verification or a restore found the backup unusable (manifest gone, digest
    # changed, a layer blob missing); restore skips broken backups.
    broken_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    broken_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    layer_count: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    # Set when the backup's manifest deletion is queued (retention or destroy); the row stays as history.
    deleted_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    updated_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    version: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=1)

    __table_args__ = (
        sa.Index("ix_backups_sandbox_created", "sandbox_id", "created_at"),
        sa.Index("ix_backups_state_runner", "state", "runner_id"),
        sa.Index("ix_backups_state_next_attempt", "state", "next_attempt_at"),
        # At most one attempt in flight per sandbox, enforced by the database itself.
        sa.Index(
            "uq_backups_one_in_flight",
            "sandbox_id",
            unique=True,
            sqlite_where=sa.text("state IN ('PENDING', 'IN_PROGRESS')"),
            postgresql_where=sa.text("state IN ('PENDING', 'IN_PROGRESS')"),
        ),
    )


class Restore(Base):
    """One restore (or drill, or move off a draining runner) of a sandbox from its backups."""

    __tablename__ = "restores"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(36), primary_key=True)
    sandbox_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("sandboxes.id"), index=True)
    purpose: orm.Mapped[str] = orm.mapped_column(sa.String(32))
    state: orm.Mapped[str] = orm.mapped_column(sa.String(32), index=True)
    # What the caller asked for: one backup only, or one runner only; empty means "choose".
    requested_backup_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(36))
    requested_runner_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    # What the restore uses now: the candidate being tried and the runner it goes to.
    backup_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(36))
    runner_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    previous_runner_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    # The id the restored container gets: the sandbox id, or a throwaway id for a drill.
    target_sandbox_id: orm.Mapped[str] = orm.mapped_column(sa.String(128))
    registry_attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    next_attempt_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    error_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    created_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    updated_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    completed_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime)
    version: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=1)

    __table_args__ = (
        # One open restore or move per sandbox, and one open drill, enforced by the database.
        sa.Index(
            "uq_restores_one_open",
            "sandbox_id",
            unique=True,
            sqlite_where=sa.text("state IN ('PENDING', 'RUNNING') AND purpose != 'DRILL'"),
            postgresql_where=sa.text("state IN ('PENDING', 'RUNNING') AND purpose != 'DRILL'"),
        ),
        sa.Index(
            "uq_restores_one_open_drill",
            "sandbox_id",
            unique=True,
            sqlite_where=sa.text("state IN ('PENDING', 'RUNNING') AND purpose = 'DRILL'"),
            postgresql_where=sa.text("state IN ('PENDING', 'RUNNING') AND purpose = 'DRILL'"),
        ),
    )


class CleanupTask(Base):
    """A registry deletion still owed: a whole backup repository, or one manifest when `digest` is set."""

    __tablename__ = "cleanup_tasks"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(36), primary_key=True)
    sandbox_id: orm.Mapped[str] = orm.mapped_column(sa.String(128), index=True)
    registry_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("registries.id"))
    repository: orm.Mapped[str] = orm.mapped_column(sa.String(1024))
    digest: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    # Destroy cleanup waits until no push of the sandbox can still be running.
    not_before: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    last_error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    done_at: orm.Mapped[datetime.datetime | None] = orm.mapped_column(UTCDateTime, index=True)
    created_at: orm.Mapped[datetime.datetime] = orm.mapped_column(UTCDateTime)
